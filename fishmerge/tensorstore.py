"""Lazy, bounded-memory reading of safetensors checkpoints, one tensor (or a block of its rows) at a time.

The header of a safetensors file says where every tensor's bytes lie, so a tensor — or a contiguous block of
its rows — is one ``pread``: no memory map whose touched pages pile up in the resident set as a merge walks
through a large model, and every byte read is counted (the merge benchmark reports it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

import torch

from fishmerge.errors import CheckpointError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
J = TypeVar("J")
R = TypeVar("R")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies and what it is."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    path: Path
    offset: int  # absolute byte offset of the tensor's data in `path`
    nbytes: int

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // rows if rows else 0


class SafetensorsFile:
    """One ``.safetensors`` file: its header parsed and checked against the file's size."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tensors, self.metadata = _parse_header(self.path)


def _parse_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    fix = "re-save or re-download it"
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes): {fix}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path} is corrupt or truncated (header length {header_len}): {fix}")
            raw = handle.read(header_len)
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from err
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is corrupt (its header is not valid JSON): {fix}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt (its header is not a JSON object): {fix}")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        info = _tensor_info(path, name, entry, data_start)
        end = max(end, info.offset + info.nbytes - data_start)
        tensors[name] = info
    if data_start + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {data_start + end} bytes but the file has "
            f"{size}: {fix}"
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, stop = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is corrupt (bad header entry for {name!r}): re-save it") from None
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if stop - begin != expected or begin < 0:
        raise CheckpointError(f"{path} is corrupt ({name!r} has {stop - begin} bytes, expected {expected}): re-save it")
    return TensorInfo(name, shape, dtype, path, data_start + begin, expected)


class TensorSource:
    """Lookup shared by every store: ``tensors`` maps each name to its :class:`TensorInfo`."""

    tensors: dict[str, TensorInfo]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]


class TensorStore(TensorSource):
    """The tensors of a checkpoint folder: one safetensors file, or shards listed by an index.

    Args:
        folder: the folder.
        stem: ``model``, ``adapter_model`` or ``fisher``: the store reads ``{stem}.safetensors`` or
            ``{stem}.safetensors.index.json`` with its shards.
    """

    def __init__(self, folder: Path, stem: str):
        self.folder = Path(folder)
        self.stem = stem
        self.files = [SafetensorsFile(p) for p in _shard_paths(self.folder, stem)]
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            for name, info in file.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{name!r} appears in two shards of {self.folder}: re-save the checkpoint")
                self.tensors[name] = info
        _check_index(self.folder, stem, self.tensors)
        self.bytes_read = 0
        # One descriptor per file for the store's lifetime: the kernel's readahead follows a file's sequential
        # reads only within one open file, and a merge reads every file front to back.
        self._fds: dict[Path, int] = {}
        weakref.finalize(self, _close_all, self._fds)

    @property
    def metadata(self) -> dict[str, str]:
        """The first shard's string metadata (writers put the same metadata in every shard)."""
        return self.files[0].metadata if self.files else {}

    def read(self, name: str, rows: slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read a tensor, or the block ``rows`` of its first dimension, from disk (into ``out`` if given:
        contiguous, shaped by :func:`block_shape`, of the tensor's dtype)."""
        info = self.tensors[name]
        offset, count = _byte_range(info, rows)
        # Read straight into the tensor's own memory: a zero-filled bytearray would cost one more pass.
        tensor = torch.empty(block_shape(info, rows), dtype=info.dtype) if out is None else out
        if tensor.dtype != info.dtype or tensor.nbytes != count or not tensor.is_contiguous():
            raise ValueError(f"out must be a contiguous {info.dtype} tensor of {count} bytes for {name} {rows}")
        if count:
            _pread_into(self._fd(info.path), info.path, offset, memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        self.bytes_read += count
        return tensor

    def prefetch(self, name: str, rows: slice | None = None) -> None:
        """Ask the OS to start reading a tensor's block from disk now, without waiting for it: a later
        :meth:`read` of it then finds it in the page cache. A no-op where ``posix_fadvise`` is missing."""
        info = self.tensors[name]
        offset, count = _byte_range(info, rows)
        if count and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd(info.path), offset, count, os.POSIX_FADV_WILLNEED)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as err:
                raise CheckpointError(f"cannot read {path}: {err.strerror}; check the path and its permissions") from err
            if hasattr(os, "posix_fadvise"):  # a larger readahead window; not on macOS or Windows
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
        return fd


def _byte_range(info: TensorInfo, rows: slice | None) -> tuple[int, int]:
    # (absolute offset, byte count) of the block `rows` of a tensor in its file.
    start, stop = (0, info.shape[0] if info.shape else 1) if rows is None else (rows.start, rows.stop)
    return info.offset + start * info.row_bytes, (stop - start) * info.row_bytes


def block_shape(info: TensorInfo, rows: slice | None) -> tuple[int, ...]:
    """The shape of the block ``rows`` of the tensor ``info`` (the whole tensor for ``None``)."""
    if rows is None or not info.shape:
        return info.shape
    return (rows.stop - rows.start, *info.shape[1:])


def read_ahead(jobs: Iterable[J], read: Callable[[J, int], R], depth: int = 1) -> Iterator[tuple[J, R]]:
    """Yield ``(job, read(job, slot))`` in order, while a background thread reads the next ``depth`` jobs.

    ``pread`` and torch kernels release the GIL, so the reads of the next block overlap with the work on the
    current one. ``slot`` cycles through ``depth + 1`` values and a slot is handed out again only after the
    consumer has asked for the job that follows its last user: ``read`` may fill buffers owned by the slot.
    An error in ``read`` is raised here, at its job.
    """
    jobs = iter(jobs)
    pending: deque[tuple[J, Future[R]]] = deque()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fishmerge-read")
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        for job in islice(jobs, 1):
            pending.append((job, pool.submit(read, job, submitted % (depth + 1))))
            submitted += 1

    try:
        for _ in range(depth + 1):
            submit()
        while pending:
            job, future = pending.popleft()
            yield job, future.result()
            submit()  # the consumer is done with `job`, so its slot is free again
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def row_blocks(info: TensorInfo, max_bytes: int) -> Iterator[slice]:
    """Blocks of rows of at most ``max_bytes`` each (at least one row) that cover the tensor ``info``."""
    rows = info.shape[0] if info.shape else 1
    step = max(1, max_bytes // max(1, info.row_bytes))
    for start in range(0, max(rows, 1), step):
        yield slice(start, min(rows, start + step))


def _pread_into(fd: int, path: Path, offset: int, buffer: memoryview) -> None:
    view = memoryview(buffer).cast("B")
    count = len(view)
    done = 0
    # One read returns at most ~2 GiB on Linux, so large tensors take several.
    while done < count:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CheckpointError(f"{path} ended early: the file is truncated; re-save or re-download it")
        done += got


def _shard_paths(folder: Path, stem: str) -> list[Path]:
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise CheckpointError(f"{folder} has neither {single.name} nor {index.name}")
    weight_map = _read_index(index)
    paths = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}; re-download the checkpoint")
    return paths


def _check_index(folder: Path, stem: str, tensors: Mapping[str, TensorInfo]) -> None:
    index = folder / f"{stem}.safetensors.index.json"
    if (folder / f"{stem}.safetensors").is_file() or not index.is_file():
        return
    weight_map = _read_index(index)
    wrong = [n for n, f in weight_map.items() if n not in tensors or tensors[n].path.name != f]
    wrong += [n for n in tensors if n not in weight_map]
    if wrong:
        raise CheckpointError(f"{index} does not match its shards (e.g. {wrong[0]!r}): re-save or re-download the checkpoint")


def _read_index(index: Path) -> Mapping[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map): re-save the checkpoint") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has an empty weight_map: re-save the checkpoint")
    return weight_map
