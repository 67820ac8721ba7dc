"""Recognise checkpoint and Fisher folders on disk and open them lazily.

A checkpoint folder is what ``save_pretrained`` writes: a ``transformers`` model (``model.safetensors`` or a
sharded index) or a PEFT adapter (``adapter_model.safetensors`` beside ``adapter_config.json``). Pickled
``.bin`` weights run arbitrary code when loaded, so they are refused unless the caller opts in, and even then
are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fishmerge.errors import CheckpointError, FisherError
from fishmerge.tensorstore import TensorInfo, TensorSource, TensorStore

logger = logging.getLogger(__name__)

FISHER_FORMAT = "fishmerge.fisher"
FISHER_STEM = "fisher"
# Files that describe a model rather than hold its weights; a merge copies them from its base input.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


class PickleStore(TensorSource):
    """``.bin`` weights loaded with ``torch.load(weights_only=True, mmap=True)``, behind TensorStore's interface."""

    def __init__(self, folder: Path, filename: str):
        self.folder = Path(folder)
        self.stem = filename.split(".")[0]
        self.bytes_read = 0
        files = [filename]
        if filename.endswith(".index.json"):
            weight_map = json.loads((self.folder / filename).read_text())["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
        self._tensors: dict[str, torch.Tensor] = {}
        for name in files:
            try:
                state = torch.load(self.folder / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many types for a bad pickle
                raise CheckpointError(f"cannot load {self.folder / name} as weights: {err}; re-save it") from err
            self._tensors.update(state)
        self.tensors = {
            n: TensorInfo(n, tuple(t.shape), t.dtype, self.folder / files[0], 0, t.numel() * t.element_size())
            for n, t in self._tensors.items()
        }
        self.metadata: dict[str, str] = {}

    def prefetch(self, name: str, rows: slice | None = None) -> None:
        """Nothing to do: the pickle is loaded already."""

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = self._tensors[name]
        block = tensor if rows is None else tensor[rows]
        self.bytes_read += block.numel() * block.element_size()
        return block.clone() if out is None else out.copy_(block)


@dataclass
class Checkpoint:
    """A model or adapter folder, opened lazily."""

    path: Path
    kind: Literal["model", "adapter"]
    store: TensorStore | PickleStore
    config: dict

    @property
    def base_model(self) -> str | None:
        """For an adapter, the model it adapts."""
        return self.config.get("base_model_name_or_path") if self.kind == "adapter" else None


def require_dir(path: Path, what: str) -> Path:
    """The folder ``path`` or a one-line error naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist: check the path")
    if not path.is_dir():
        raise CheckpointError(f"{what} {path} is a file, not a folder: give the folder written by save_pretrained")
    return path


def open_checkpoint(path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a ``transformers`` model or PEFT adapter folder without reading any tensor data."""
    path = require_dir(path, "checkpoint")
    if (path / "adapter_config.json").is_file():
        kind, stem, config_file = "adapter", "adapter_model", "adapter_config.json"
    else:
        kind, stem, config_file = "model", "model", "config.json"
    if (path / f"{stem}.safetensors").is_file() or (path / f"{stem}.safetensors.index.json").is_file():
        store: TensorStore | PickleStore = TensorStore(path, stem)
    else:
        store = _open_pickle(path, allow_pickle)
    return Checkpoint(path, kind, store, _read_json(path / config_file))  # type: ignore[arg-type]


def _open_pickle(path: Path, allow_pickle: bool) -> PickleStore:
    found = [name for name in PICKLE_FILES if (path / name).is_file()]
    if not found:
        raise CheckpointError(
            f"{path} is not a checkpoint: it has no model.safetensors, model.safetensors.index.json or "
            "adapter_model.safetensors; give a folder written by save_pretrained"
        )
    if not allow_pickle:
        raise CheckpointError(
            f"{path} holds pickled weights ({found[0]}), which can run code when loaded: convert them to "
            "safetensors (load and save_pretrained) or pass --allow-pickle if you trust the file"
        )
    logger.warning("loading pickled weights from %s with torch.load(weights_only=True)", path / found[0])
    return PickleStore(path, found[0])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): re-save the checkpoint") from None


@dataclass
class FisherCheckpoint:
    """A Fisher folder written by ``fishmerge estimate`` (SPEC §1), opened lazily."""

    path: Path
    store: TensorStore

    @property
    def metadata(self) -> dict[str, str]:
        return self.store.metadata

    @property
    def n_examples(self) -> int:
        return int(self.metadata["n_examples"])


def open_fisher(path: Path) -> FisherCheckpoint:
    """Open a Fisher folder and check its metadata; tensor values are checked as they are read."""
    path = Path(path)
    if not path.exists():
        raise FisherError(f"Fisher {path} does not exist: check the path or run `fishmerge estimate` first")
    if not path.is_dir():
        raise FisherError(f"Fisher {path} is a file, not a folder: give the folder written by `fishmerge estimate`")
    try:
        store = TensorStore(path, FISHER_STEM)
    except CheckpointError as err:
        raise FisherError(f"{err}: give a folder written by `fishmerge estimate`") from None
    metadata = store.metadata
    if metadata.get("format") != FISHER_FORMAT:
        raise FisherError(f"{path} is not a fishmerge Fisher (metadata format={metadata.get('format')!r}): "
                          "estimate one with `fishmerge estimate`")
    try:
        if int(metadata["n_examples"]) <= 0:
            raise ValueError
    except (KeyError, ValueError):
        raise FisherError(f"{path} has no valid n_examples in its metadata: re-estimate it") from None
    non_float = [n for n, i in store.tensors.items() if i.dtype != torch.float32]
    if non_float:
        raise FisherError(f"{path} holds non-fp32 tensors ({non_float[0]}, ...): re-estimate it with fishmerge")
    return FisherCheckpoint(path, store)


def copy_aux_files(source: Path, dest: Path) -> list[str]:
    """Copy config, generation config, adapter config and tokenizer files; return the names copied."""
    copied = []
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied
