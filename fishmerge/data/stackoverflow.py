"""TensorFlow Federated's Stack Overflow dataset: the ``stackoverflow.sqlite`` file and its word-level task.

The file (TFF ``tff.simulation.datasets.stackoverflow``, used by Reddi et al. 2021, "Adaptive Federated
Optimization", and by FedFish) holds two tables::

    examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)
    client_metadata(client_id TEXT, split_name TEXT, num_examples INTEGER)

with splits ``train``, ``heldout`` and ``test``; every row of ``examples`` is one sentence serialized as a
``tf.train.Example`` with string features ``tokens``, ``title``, ``tags``, ``type``, ``creation_date`` and an
int64 ``score``. :class:`StackOverflowReader` streams it (one client or one split at a time, rows in stored
order, never the whole file) and :class:`StackOverflowWriter` writes the same schema, so synthetic users and
converted Stack Exchange dumps are read by the same code as TFF's original file.

The word-level vocabulary (:func:`build_vocab`) is the ``vocab_size`` most frequent words of the train split;
ties in frequency are broken by the word's code-point (``str``) order, so the vocabulary is a pure function of
the counts. TFF ships a precomputed word-count file instead; its order among equal counts is not documented,
so with TFF's own file the last few vocabulary slots may differ from TFF's among words with the same count.
"""

from __future__ import annotations

import itertools
import logging
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Union

from fishmerge.data.example_proto import decode_example, encode_example
from fishmerge.errors import DataError

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
SPLITS: tuple[str, ...] = ("train", "heldout", "test")
STRING_FEATURES: tuple[str, ...] = ("tokens", "title", "tags", "type", "creation_date")
INT_FEATURES: tuple[str, ...] = ("score",)
DEFAULT_VOCAB_SIZE = 10_000

_SCHEMA = {
    "examples": ("split_name", "client_id", "serialized_example_proto"),
    "client_metadata": ("client_id", "split_name", "num_examples"),
}
_CREATE = (
    "CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto BLOB)",
    "CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, num_examples INTEGER)",
)


class ClientInfo(NamedTuple):
    """One client of a split and how many examples (sentences) it holds."""

    client_id: str
    num_examples: int


# ------------------------------------------------------------------------------------------------ examples
def encode_stackoverflow_example(example: Mapping[str, object]) -> bytes:
    """Serialize one sentence in TFF's Stack Overflow feature layout.

    Args:
        example: ``tokens``, ``title``, ``tags``, ``type``, ``creation_date`` (str; missing ones become "")
            and ``score`` (int; missing becomes 0).

    Returns:
        A serialized ``tf.train.Example``.

    Raises:
        DataError: A feature has the wrong type or an unknown feature name is given.
    """
    unknown = set(example) - set(STRING_FEATURES) - set(INT_FEATURES)
    if unknown:
        raise DataError(f"unknown Stack Overflow feature(s) {sorted(unknown)}; use only {STRING_FEATURES + INT_FEATURES}")
    features: dict[str, object] = {}
    for name in STRING_FEATURES:
        value = example.get(name, "")
        if not isinstance(value, str):
            raise DataError(f"Stack Overflow feature {name!r} must be a str, got {type(value).__name__}; convert it first")
        features[name] = value
    score = example.get("score", 0)
    if isinstance(score, bool) or not isinstance(score, int):
        raise DataError(f"Stack Overflow feature 'score' must be an int, got {type(score).__name__}; convert it first")
    features["score"] = score
    return encode_example(features)  # type: ignore[arg-type]


def decode_stackoverflow_example(blob: bytes) -> dict[str, str | int]:
    """Parse one serialized sentence into ``{tokens, title, tags, type, creation_date: str, score: int}``.

    Raises:
        DataError: The blob is not a Stack Overflow ``tf.train.Example``.
    """
    raw = decode_example(blob)
    out: dict[str, str | int] = {}
    for name in STRING_FEATURES:
        values = raw.get(name, [b""]) or [b""]
        if not isinstance(values[0], bytes):
            raise DataError(f"feature {name!r} is not a bytes_list; this is not a TFF Stack Overflow example")
        out[name] = values[0].decode("utf-8", errors="replace")
    score = raw.get("score", [0]) or [0]
    if not isinstance(score[0], int):
        raise DataError("feature 'score' is not an int64_list; this is not a TFF Stack Overflow example")
    out["score"] = int(score[0])
    return out


# -------------------------------------------------------------------------------------------------- reader
class StackOverflowReader:
    """Streaming, read-only access to a ``stackoverflow.sqlite`` file (TFF's or one we wrote).

    Example:
        >>> with StackOverflowReader("stackoverflow.sqlite") as reader:
        ...     first = reader.clients("train")[0]
        ...     sentences = [ex["tokens"] for ex in reader.examples("train", first.client_id)]

    Raises:
        DataError: The file is missing, not SQLite, or lacks the two tables and their columns.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"Stack Overflow file not found: {self.path}; pass the path of stackoverflow.sqlite")
        # mode=ro: a reader must never create or modify the (possibly 60 GB) shared file.
        self._conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            self._check_schema()
        except Exception:
            self._conn.close()
            raise

    def _check_schema(self) -> None:
        try:
            for table, columns in _SCHEMA.items():
                found = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                missing = [c for c in columns if c not in found]
                if not found:
                    raise DataError(f"{self.path} has no table {table!r}; pass a TFF stackoverflow.sqlite file")
                if missing:
                    raise DataError(f"table {table!r} in {self.path} lacks column(s) {missing}; pass a TFF stackoverflow.sqlite file")
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{self.path} is not a SQLite database ({exc}); pass a TFF stackoverflow.sqlite file") from None

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> StackOverflowReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def split_sizes(self) -> dict[str, int]:
        """Number of clients in each split present in ``client_metadata``."""
        rows = self._conn.execute("SELECT split_name, COUNT(*) FROM client_metadata GROUP BY split_name ORDER BY split_name")
        return {split: count for split, count in rows}

    def clients(self, split: str) -> list[ClientInfo]:
        """All clients of ``split`` with their example counts, sorted by client id.

        Raises:
            DataError: The split has no clients.
        """
        rows = self._conn.execute(
            "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ? ORDER BY client_id", (split,)
        ).fetchall()
        if not rows:
            raise DataError(
                f"split {split!r} of {self.path} has no clients (splits present: {self.split_sizes()}); pick another split"
            )
        return [ClientInfo(str(cid), int(n)) for cid, n in rows]

    def examples(self, split: str, client_id: str) -> Iterator[dict[str, str | int]]:
        """Iterate one client's sentences, decoded, in their stored order (SQLite ``rowid``).

        Raises:
            DataError: The client has no examples in this split (raised at the call, not at first ``next``).
        """
        cursor = self._conn.execute(
            "SELECT serialized_example_proto FROM examples WHERE split_name = ? AND client_id = ? ORDER BY rowid",
            (split, client_id),
        )
        first = cursor.fetchone()
        if first is None:
            raise DataError(f"client {client_id!r} has no examples in split {split!r} of {self.path}; list clients with .clients()")
        return (decode_stackoverflow_example(blob) for (blob,) in itertools.chain([first], cursor))

    def iter_split(self, split: str) -> Iterator[tuple[str, dict[str, str | int]]]:
        """Iterate ``(client_id, example)`` over every sentence of a split, in stored order, streaming.

        Raises:
            DataError: The split has no examples (raised at the call).
        """
        cursor = self._conn.execute(
            "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ? ORDER BY rowid", (split,)
        )
        first = cursor.fetchone()
        if first is None:
            raise DataError(f"split {split!r} of {self.path} has no examples; pick one of {sorted(self.split_sizes())}")
        return ((str(cid), decode_stackoverflow_example(blob)) for cid, blob in itertools.chain([first], cursor))


# -------------------------------------------------------------------------------------------------- writer
class StackOverflowWriter:
    """Write per-client sentences into a new file with TFF's Stack Overflow schema.

    The file is built under ``<name>.partial`` and renamed into place by :meth:`close` (or a clean exit
    from the ``with`` block), so an interrupted write never leaves a half-file at ``path``. Identical calls
    produce byte-identical files.

    Example:
        >>> with StackOverflowWriter("tiny.sqlite") as writer:
        ...     writer.add_client("train", "00000001", [{"tokens": "hello world .", "type": "question"}])

    Raises:
        DataError: ``path`` exists and ``overwrite`` is false.
    """

    def __init__(self, path: PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path} already exists; pass overwrite=True or choose another output path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._partial.unlink(missing_ok=True)
        self._conn: sqlite3.Connection | None = sqlite3.connect(self._partial)
        for statement in _CREATE:
            self._conn.execute(statement)
        self._seen: set[tuple[str, str]] = set()
        self.counts: Counter[str] = Counter()

    def add_client(self, split: str, client_id: str, examples: Iterable[Mapping[str, object]]) -> int:
        """Append one client's sentences (dicts as :func:`encode_stackoverflow_example` takes) in the given order.

        Returns:
            The number of examples written.

        Raises:
            DataError: The writer is closed, the client was already written to this split, or it has no examples.
        """
        return self.add_serialized_client(split, client_id, (encode_stackoverflow_example(ex) for ex in examples))

    def add_serialized_client(self, split: str, client_id: str, blobs: Iterable[bytes]) -> int:
        """Like :meth:`add_client` for already serialized ``tf.train.Example`` blobs (no re-encoding).

        Raises:
            DataError: The writer is closed, the client was already written to this split, or it has no examples.
        """
        if self._conn is None:
            raise DataError(f"writer for {self.path} is closed; open a new StackOverflowWriter")
        if (split, client_id) in self._seen:
            raise DataError(f"client {client_id!r} was already written to split {split!r}; give each client all its examples at once")
        rows = [(split, client_id, bytes(blob)) for blob in blobs]
        if not rows:
            raise DataError(f"client {client_id!r} has no examples; drop it before writing")
        self._conn.executemany("INSERT INTO examples VALUES (?, ?, ?)", rows)
        self._conn.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, split, len(rows)))
        self._seen.add((split, client_id))
        self.counts[split] += 1
        return len(rows)

    def close(self) -> Path:
        """Index, commit and move the file into place; returns its path."""
        if self._conn is not None:
            # One index keeps per-client reads fast; built at the end, which is cheaper than maintaining it.
            self._conn.execute("CREATE INDEX examples_split_client ON examples (split_name, client_id)")
            self._conn.commit()
            self._conn.close()
            self._conn = None
            os.replace(self._partial, self.path)
            logger.info("wrote %s (clients per split: %s)", self.path, dict(self.counts))
        return self.path

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> StackOverflowWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------- vocabulary
def count_words(sentences: Iterable[str]) -> Counter[str]:
    """Count whitespace-separated words over sentences."""
    counts: Counter[str] = Counter()
    for sentence in sentences:
        counts.update(sentence.split())
    return counts


def top_words(counts: Mapping[str, int], vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[str]:
    """The ``vocab_size`` most frequent words, most frequent first; ties broken by ``str`` order of the word.

    Raises:
        DataError: ``vocab_size`` is not positive or there are no words.
    """
    if vocab_size < 1:
        raise DataError(f"vocab_size must be at least 1, got {vocab_size}; pass a positive vocabulary size")
    if not counts:
        raise DataError("no words to build a vocabulary from; check that the split holds non-empty sentences")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if len(ranked) < vocab_size:
        logger.warning("only %d distinct words, fewer than vocab_size=%d; the vocabulary is smaller", len(ranked), vocab_size)
    return [word for word, _ in ranked[:vocab_size]]


def build_vocab(path: PathLike, *, split: str = "train", vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[str]:
    """The word-level task's vocabulary: the most frequent words of ``split`` (streamed once).

    Raises:
        DataError: The file is unusable or the split is empty.
    """
    with StackOverflowReader(path) as reader:
        counts = count_words(str(ex["tokens"]) for _, ex in reader.iter_split(split))
    return top_words(counts, vocab_size)
