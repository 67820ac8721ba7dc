"""Streaming safetensors writer and lazy reader, checked against the safetensors library itself."""

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fishmerge.errors import CheckpointError, OutputError
from fishmerge.tensorstore import TensorStore, read_ahead, row_blocks
from fishmerge.writer import ShardedWriter, TensorSpec, atomic_output_dir, check_output_path, parse_size, save_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(3, 4, generator=g).bfloat16(),
        "c.bias": torch.randn(11, generator=g).half(),
        "d.ids": torch.arange(6, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
    }


def test_written_file_loads_with_safetensors(tmp_path):
    tensors = _tensors()
    save_tensors(tmp_path, "model", tensors, metadata={"format": "pt", "k": "v"})
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_sharding_by_byte_budget_writes_an_index(tmp_path):
    tensors = _tensors()
    paths = save_tensors(tmp_path, "model", tensors, max_shard_bytes=64)
    assert len(paths) > 1
    assert paths[0].name == f"model-00001-of-{len(paths):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    store = TensorStore(tmp_path, "model")
    for name, tensor in tensors.items():
        assert torch.equal(store.read(name), tensor)


def test_reader_reads_files_written_by_safetensors_in_row_blocks(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"x": "1"})
    store = TensorStore(tmp_path, "model")
    assert store.metadata == {"x": "1"}
    info = store.info("a.weight")
    blocks = [store.read("a.weight", rows) for rows in row_blocks(info, max_bytes=2 * 5 * 4)]
    assert [b.shape[0] for b in blocks] == [2, 2, 2, 1]
    assert torch.equal(torch.cat(blocks), tensors["a.weight"])
    assert torch.equal(store.read("e.scalar"), tensors["e.scalar"])
    assert store.bytes_read == tensors["a.weight"].numel() * 4 + 4


def test_writer_accepts_row_blocks_and_refuses_the_wrong_order(tmp_path):
    specs = [TensorSpec("x", (4, 2), torch.float32), TensorSpec("y", (2,), torch.float32)]
    writer = ShardedWriter(tmp_path, "model", specs, max_shard_bytes=10**9)
    x = torch.arange(8.0).reshape(4, 2)
    writer.write("x", x[:3])
    writer.write("x", x[3:])
    with pytest.raises(RuntimeError):
        writer.write("z", torch.zeros(2))
    writer.write("y", torch.ones(2))
    writer.close()
    assert torch.equal(TensorStore(tmp_path, "model").read("x"), x)


def test_closing_before_everything_is_written_fails(tmp_path):
    writer = ShardedWriter(tmp_path, "model", [TensorSpec("x", (2,), torch.float32)], max_shard_bytes=100)
    with pytest.raises(RuntimeError, match="before every planned tensor"):
        writer.close()


def test_truncated_and_corrupt_files_are_named(tmp_path):
    save_tensors(tmp_path, "model", _tensors())
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorStore(tmp_path, "model")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 32)
    with pytest.raises(CheckpointError, match="corrupt"):
        TensorStore(tmp_path, "model")
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        TensorStore(tmp_path, "model")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123
    with pytest.raises(Exception, match="5GB"):
        parse_size("lots")


def test_atomic_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "deep" / "out"
    with pytest.raises(ZeroDivisionError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_text("partial")
            1 / 0
    assert not out.exists() and not (tmp_path / "deep").exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok"


def test_output_may_not_be_or_hold_an_input(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for bad in (model, model / "merged"):
        with pytest.raises(OutputError, match="inside input"):
            check_output_path(bad, [model], overwrite=True)
    with pytest.raises(OutputError, match="lies inside output"):
        check_output_path(tmp_path, [model], overwrite=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="--overwrite"):
        check_output_path(tmp_path / "taken", [model], overwrite=False)


def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    save_tensors(tmp_path, "model", _tensors(), max_shard_bytes=64)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["a.weight"], index["weight_map"]["c.bias"] = index["weight_map"]["c.bias"], index["weight_map"]["a.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not match its shards"):
        TensorStore(tmp_path, "model")


def test_read_ahead_yields_in_order_and_never_refills_the_slot_in_use():
    in_use = [None]

    def read(job, slot):
        assert slot != in_use[0], "a slot was refilled while its block was still being used"
        return slot

    jobs, slots = [], []
    for job, slot in read_ahead(range(30), read, depth=2):
        in_use[0] = slot
        time.sleep(0.001)  # the reader runs ahead meanwhile
        jobs.append(job)
        slots.append(slot)
        in_use[0] = None
    assert jobs == list(range(30))
    assert slots == [k % 3 for k in range(30)]


def test_read_ahead_raises_a_read_error_at_its_job():
    def read(job, slot):
        if job == 3:
            raise OSError("disk on fire")
        return job

    got = []
    with pytest.raises(OSError, match="disk on fire"):
        for _, value in read_ahead(range(10), read):
            got.append(value)
    assert got == [0, 1, 2]
