"""Text datasets from files or ``save_to_disk`` folders, tokenized into padded causal-LM batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from fishmerge.errors import DataError, one_line

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_texts(data: str | Path, *, text_column: str | None = None, max_examples: int | None = None) -> list[str]:
    """The texts of a ``.jsonl``/``.json``/``.csv``/``.parquet``/``.txt`` file or a ``save_to_disk`` folder.

    A ``.txt`` file holds one example per non-empty line. The text column defaults to ``text``, or to the only
    string column.
    """
    path = Path(data)
    if not path.exists():
        raise DataError(f"data {path} does not exist: check the path")
    if path.suffix == ".txt":
        texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        dataset = load_dataset_path(path)
        column = _text_column(dataset, text_column, path)
        texts = [str(t) for t in dataset[column] if t is not None and str(t).strip()]
    if max_examples is not None:
        texts = texts[:max_examples]
    if not texts:
        raise DataError(f"{path} has no non-empty examples: point at a dataset with text in it")
    return texts


def load_dataset_path(path: Path):
    """A ``datasets.Dataset`` from a ``save_to_disk`` folder (its ``train`` split) or a data file."""
    import datasets

    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded:
                    raise DataError(f"{path} holds splits {sorted(loaded)} but no 'train': save the split to use")
                loaded = loaded["train"]
            return loaded
        builder = BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{path}: unsupported data format {path.suffix!r}: use .jsonl, .json, .csv, .parquet, .txt "
                            "or a save_to_disk folder")
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {path} as a dataset: {one_line(err)}") from err


def _text_column(dataset, text_column: str | None, path: Path) -> str:
    columns = list(dataset.column_names)
    if text_column is not None:
        if text_column not in columns:
            raise DataError(f"{path} has no column {text_column!r} (columns: {', '.join(columns)}): pass --text-column")
        return text_column
    if "text" in columns:
        return "text"
    strings = [c for c in columns if getattr(dataset.features[c], "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise DataError(f"{path} has no 'text' column (columns: {', '.join(columns)}): pass --text-column NAME")


def tokenize(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids per text, truncated to ``max_length``; texts with fewer than 2 tokens predict nothing and are dropped."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    kept = [ids for ids in encoded if len(ids) >= 2]
    if len(kept) < len(encoded):
        logger.info("dropped %d examples with fewer than 2 tokens", len(encoded) - len(kept))
    if not kept:
        raise DataError("every example is shorter than 2 tokens, so there is nothing to predict: use longer texts")
    return kept


def collate(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad into ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batches(sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive padded batches, in order."""
    for start in range(0, len(sequences), batch_size):
        yield collate(sequences[start : start + batch_size], pad_id)
