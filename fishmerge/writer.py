"""Writing safetensors checkpoints as a stream, and output folders that appear only when complete.

The layout of every output shard is planned from the tensors' names, shapes and dtypes before any data exists,
so each shard's header is written first and tensor bytes follow in order as they are computed: nothing is
buffered beyond the block being written, whatever the shard size (mergekit's byte-budget sharding, without
holding a shard in memory).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fishmerge.errors import ConfigError, OutputError
from fishmerge.tensorstore import DTYPE_NAMES

logger = logging.getLogger(__name__)

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB`` or a plain number of bytes (the convention of ``save_pretrained``)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(f"cannot read size {size!r}: write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ConfigError(f"size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: known before its values are."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Writes planned tensors into ``{stem}.safetensors`` or ``{stem}-0000k-of-0000n.safetensors`` + index.

    Tensors must be written in the planned order; each may arrive in blocks of rows (``write`` called several
    times), which is what keeps a merge's memory independent of the largest tensor.
    """

    def __init__(
        self,
        folder: Path,
        stem: str,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.stem = stem
        self.metadata = dict(metadata or {})
        self.shards = plan_shards(specs, max_shard_bytes)
        n = len(self.shards)
        self.filenames = (
            [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        self._queue: Iterator[tuple[int, TensorSpec]] = ((k, s) for k, shard in enumerate(self.shards) for s in shard)
        self._handle = None
        self._shard = -1
        self._current: TensorSpec | None = None
        self._remaining = 0
        self.bytes_written = 0

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append ``block`` (the whole tensor or its next rows) to the tensor ``name``."""
        if self._remaining == 0:
            self._advance(name)
        assert self._current is not None
        if self._current.name != name or block.dtype != self._current.dtype:
            raise RuntimeError(f"expected {self._current.name} ({self._current.dtype}), got {name} ({block.dtype})")
        data = block.contiguous().view(-1).view(torch.uint8).numpy() if block.numel() else b""
        if len(data) > self._remaining:
            raise RuntimeError(f"{name}: more data than its planned shape {self._current.shape}")
        self._handle.write(data)  # type: ignore[union-attr]
        self._remaining -= len(data)
        self.bytes_written += len(data)

    def close(self) -> list[Path]:
        """Check that every planned tensor was written in full and write the index of a sharded output."""
        if self._remaining or next(self._queue, None) is not None:
            raise RuntimeError("closing a checkpoint writer before every planned tensor was written")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self.shards) > 1:
            self._write_index()
        return [self.folder / f for f in self.filenames]

    def _advance(self, name: str) -> None:
        step = next(self._queue, None)
        if step is None:
            raise RuntimeError(f"{name}: not in the planned output")
        shard, spec = step
        if shard != self._shard:
            self._open_shard(shard)
        self._current = spec
        self._remaining = spec.nbytes
        if spec.nbytes == 0:  # an empty tensor is complete as soon as it is announced
            self._remaining = 0

    def _open_shard(self, shard: int) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard = shard
        self._handle = (self.folder / self.filenames[shard]).open("wb")
        self._handle.write(_header_bytes(self.shards[shard], self.metadata))

    def _write_index(self) -> None:
        weight_map = {spec.name: self.filenames[k] for k, shard in enumerate(self.shards) for spec in shard}
        total = sum(spec.nbytes for shard in self.shards for spec in shard)
        index = {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def save_tensors(
    folder: Path,
    stem: str,
    tensors: dict[str, torch.Tensor],
    *,
    max_shard_bytes: int = 5 * 10**9,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write in-memory tensors as a (possibly sharded) safetensors checkpoint."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = ShardedWriter(folder, stem, specs, max_shard_bytes=max_shard_bytes, metadata=metadata)
    for name, tensor in tensors.items():
        writer.write(name, tensor.detach().cpu())
    return writer.close()


def check_output_path(out: Path, inputs: Sequence[Path], *, overwrite: bool) -> Path:
    """Refuse an output that is, contains or lies inside an input, or that exists without ``overwrite``."""
    out = Path(out).resolve()
    for path in inputs:
        path = Path(path).resolve()
        if out == path or path in out.parents:
            raise OutputError(f"output {out} is inside input {path}: choose an output folder outside every input")
        if out in path.parents:
            raise OutputError(f"input {path} lies inside output {out}: choose an output folder that holds no input")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists: choose another output folder or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder: choose another output path")
    return out


@contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that is renamed to ``out`` only if the block completes.

    On any error the temporary folder (and any parent this created) is removed, so a failed run leaves no
    folder that looks like a result. With ``overwrite`` an existing ``out`` is replaced only after the new
    folder is complete.
    """
    out = Path(out).resolve()
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise OutputError(f"{out} appeared while writing: choose another output folder or pass --overwrite")
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
