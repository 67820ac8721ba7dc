"""Per-user clients for a federated run, as token-id sequences in each client's chronological order.

Sources (SPEC §5): TFF's ``stackoverflow.sqlite`` and the word-level task; Stack Exchange ``Posts.xml``
converted to the same schema; the seeded synthetic generator written to the same schema (the embedded
default); or any ``datasets`` dataset with a user-id and a text column, tokenized with the model's own
tokenizer. Client selection and subsampling are seeded from (seed, round, client index) with NumPy's
SeedSequence, never Python's salted ``hash()``, so every process draws the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fishmerge.data.partition import partition_by_user
from fishmerge.data.posts_xml import convert_posts_xml
from fishmerge.data.stackoverflow import StackOverflowReader, build_vocab
from fishmerge.data.synthetic import write_synthetic_stackoverflow
from fishmerge.data.tokenizer import OOV_TOKEN, build_word_level_tokenizer, word_sequences
from fishmerge.errors import DataError
from fishmerge.federated.config import DataSpec
from fishmerge.textdata import load_dataset_path

logger = logging.getLogger(__name__)

Sequences = list[list[int]]


@dataclass
class FederatedData:
    """Train clients, evaluation clients and how to read each one's sequences."""

    tokenizer: object
    train_clients: list[str]
    eval_clients: dict[str, list[str]]  # split -> client ids
    read: Callable[[str, str], Sequences]  # (split, client id) -> sequences, chronological
    description: str
    exclude_ids: tuple[int, ...] = ()  # targets left out of the second accuracy (PAD, OOV, EOS)
    _cache: dict[tuple[str, str], Sequences] = field(default_factory=dict, repr=False)

    def sequences(self, split: str, client_id: str) -> Sequences:
        """A client's sequences; read once and kept until :meth:`forget` (a round reads its clients twice)."""
        key = (split, client_id)
        if key not in self._cache:
            self._cache[key] = self.read(split, client_id)
        return self._cache[key]

    def forget(self, split: str) -> None:
        """Drop the kept sequences of ``split``, so memory holds one round's clients, not the whole dataset."""
        self._cache = {key: value for key, value in self._cache.items() if key[0] != split}


def is_word_level(tokenizer) -> bool:
    return getattr(tokenizer, "unk_token", None) == OOV_TOKEN


def subsample(sequences: Sequences, limit: int | None, seed: int, round_index: int, client_index: int) -> Sequences:
    """At most ``limit`` sequences, drawn without replacement, kept in chronological order."""
    if limit is None or len(sequences) <= limit:
        return sequences
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index, client_index, 1]))
    keep = np.sort(rng.choice(len(sequences), size=limit, replace=False))
    return [sequences[i] for i in keep]


def sample_clients(clients: Sequence[str], k: int, seed: int, round_index: int) -> list[str]:
    """Uniform without replacement, the same in every process (SPEC §3)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index, 0]))
    chosen = rng.choice(len(clients), size=min(k, len(clients)), replace=False)
    return [clients[i] for i in sorted(chosen)]


def load_federated_data(spec: DataSpec, cache_dir: Path, tokenizer=None) -> FederatedData:
    """Build the clients of ``spec``; ``tokenizer`` is the model's (required for ``source: dataset``)."""
    if spec.source == "dataset":
        return _from_dataset(spec, tokenizer)
    path = _sqlite_path(spec, cache_dir)
    return _from_sqlite(path, spec, tokenizer, cache_dir)


def _sqlite_path(spec: DataSpec, cache_dir: Path) -> Path:
    if spec.source == "stackoverflow":
        return Path(spec.path)  # type: ignore[arg-type]
    cache_dir.mkdir(parents=True, exist_ok=True)
    if spec.source == "posts_xml":
        source = Path(spec.path)  # type: ignore[arg-type]
        if not source.is_file():
            raise DataError(f"Posts.xml {source} does not exist: check data.path")
        key = _digest(source.resolve(), source.stat().st_size, source.stat().st_mtime_ns, spec.min_examples)
        target = cache_dir / f"posts-{source.stem}-{key}.sqlite"
        if not target.exists():
            convert_posts_xml(source, target, min_sentences=spec.min_examples)
        return target
    key = _digest(spec.train_users, spec.heldout_users, spec.test_users, spec.seed)
    target = cache_dir / f"synthetic-{key}.sqlite"
    if not target.exists():
        write_synthetic_stackoverflow(target, num_train_users=spec.train_users, num_heldout_users=spec.heldout_users,
                                      num_test_users=spec.test_users, seed=spec.seed)
    return target


def _from_sqlite(path: Path, spec: DataSpec, tokenizer, cache_dir: Path) -> FederatedData:
    reader = StackOverflowReader(path)
    if tokenizer is None:
        tokenizer = build_word_level_tokenizer(_cached_vocab(path, spec.vocab_size, cache_dir), max_words=spec.max_words)

    def enough(split: str) -> list[str]:
        sizes = reader.split_sizes()
        if not sizes.get(split):
            return []
        return [c.client_id for c in reader.clients(split) if c.num_examples >= spec.min_examples]

    train = enough("train")
    if not train:
        raise DataError(f"{path} has no train client with at least {spec.min_examples} examples: lower data.min_examples")
    evals = {split: _first_seeded(enough(split), spec.eval_clients, spec.seed) for split in ("heldout", "test")}

    def read(split: str, client_id: str) -> Sequences:
        sentences = [ex["tokens"] for ex in reader.examples(split, client_id)]
        if is_word_level(tokenizer):
            return word_sequences(tokenizer, sentences, spec.max_words)
        return _subword_sequences(tokenizer, sentences, spec.max_length)

    excluded = ()
    if is_word_level(tokenizer):
        excluded = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
    return FederatedData(tokenizer, train, evals, read, f"{spec.source}: {path}", excluded)


def _cached_vocab(path: Path, size: int, cache_dir: Path) -> list[str]:
    # Counting the words of TFF's whole train split takes minutes; do it once per file and size.
    stat = path.stat()
    cache = Path(cache_dir) / f"vocab-{_digest(path.resolve(), stat.st_size, stat.st_mtime_ns, size)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    vocab = build_vocab(path, vocab_size=size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(vocab))
    return vocab


def _from_dataset(spec: DataSpec, tokenizer) -> FederatedData:
    if tokenizer is None:
        raise DataError("data.source dataset is tokenized with the model's own tokenizer: set model.path to a checkpoint")
    path = Path(spec.path)  # type: ignore[arg-type]
    if not path.exists():
        raise DataError(f"dataset {path} does not exist: check data.path")
    clients = partition_by_user(load_dataset_path(path), user_column=spec.user_column, text_column=spec.text_column,
                                min_examples=spec.min_examples)
    ids = list(clients)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 7]))
    held = set(rng.choice(len(ids), size=min(spec.eval_clients, max(0, len(ids) - 1)), replace=False).tolist())
    train = [c for i, c in enumerate(ids) if i not in held]
    evaluation = [c for i, c in enumerate(ids) if i in held]

    def read(split: str, client_id: str) -> Sequences:
        return _subword_sequences(tokenizer, list(clients[client_id][spec.text_column]), spec.max_length)

    return FederatedData(tokenizer, train, {"heldout": evaluation, "test": evaluation}, read, f"dataset: {path}")


def _subword_sequences(tokenizer, texts: Sequence[str], max_length: int) -> Sequences:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length - 1)["input_ids"]
    eos = tokenizer.eos_token_id
    return [ids + [eos] if eos is not None else ids for ids in encoded if len(ids) >= 1]


def _first_seeded(clients: list[str], k: int, seed: int) -> list[str]:
    if len(clients) <= k:
        return clients
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    return sorted(clients[i] for i in rng.choice(len(clients), size=k, replace=False))


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
