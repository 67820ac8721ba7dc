"""Merge benchmark: wall time, bytes read, throughput and peak memory of `fisher` and `average` merges of four
sharded bf16 Llama checkpoints with fp32 Fishers, against the I/O floor and mergekit's `linear` merge.

    python benchmarks/merge_io.py --workdir /tmp/fishmerge-bench [--sizes small,0.5b] [--repeats 3]

Checkpoints and Fishers are built once into --workdir (random weights, random positive Fishers: the merge's
cost does not depend on the values) and reused by later runs. Every merge runs in its own process so that its
peak RSS is its own (os.wait4 gives the child's rusage). Before every timed run the inputs are put in the same
page-cache state for the merges and for the floor alike: `--cache warm` (the default) reads them all once with
`cat`, so the figures measure the merge path, not the disk; `--cache cold` evicts them, so every run reads
from the disk, as a merge of freshly downloaded checkpoints does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, print_table, write_json  # noqa: E402

N_MODELS = 4
# Llama shapes; "0.5b" is the issue's ~0.5B model (hidden 1024, 24 layers), "small" a ~34M one.
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "config": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=8000),
        "model_shard": "25MB",
        "fisher_shard": 50 * 10**6,
    },
    "0.5b": {
        "config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000),
        "model_shard": "400MB",
        "fisher_shard": 800 * 10**6,
    },
}
DEFAULT_MERGEKIT = "/work/bench-venv/bin/mergekit-yaml"


# ------------------------------------------------------------------------------------------------------------
# Building the inputs (once)
# ------------------------------------------------------------------------------------------------------------


def build_size(workdir: Path, size: str) -> Path:
    """Four checkpoints and their Fishers under workdir/size; skipped when a previous build completed."""
    root = workdir / size
    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for i in range(N_MODELS):
        _build_one(root, size, i)
    done.write_text("ok\n")
    return root


def _build_one(root: Path, size: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fishmerge.fisher.accumulate import FisherSums, fisher_metadata, save_fisher

    spec = SIZES[size]
    torch.manual_seed(seed)
    config = LlamaConfig(**spec["config"], tie_word_embeddings=False, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model_dir = root / f"model-{seed}"
    model.save_pretrained(model_dir, max_shard_size=spec["model_shard"])
    shapes = {name: p.shape for name, p in model.named_parameters()}
    del model
    g = torch.Generator().manual_seed(1000 + seed)
    # Strictly positive: the merge refuses negative Fishers and the values do not change its cost.
    fisher = {name: torch.rand(shape, generator=g).add_(1e-6) for name, shape in shapes.items()}
    sums = FisherSums(fisher, n_examples=100, n_tokens=12800, estimator="empirical")
    save_fisher(root / f"fisher-{seed}", fisher, fisher_metadata(sums, model=str(model_dir), data="random"),
                max_shard_bytes=spec["fisher_shard"])
    print(f"built {model_dir} and its Fisher", flush=True)


def input_files(root: Path, with_fishers: bool) -> list[Path]:
    folders = [root / f"model-{i}" for i in range(N_MODELS)]
    if with_fishers:
        folders += [root / f"fisher-{i}" for i in range(N_MODELS)]
    return sorted(p for folder in folders for p in folder.glob("*.safetensors"))


def param_count(root: Path) -> int:
    import math

    from fishmerge.tensorstore import TensorStore

    store = TensorStore(root / "model-0", "model")
    return sum(math.prod(info.shape) for info in store.tensors.values())


# ------------------------------------------------------------------------------------------------------------
# Timed runs
# ------------------------------------------------------------------------------------------------------------


def prepare_cache(files: list[Path], cache: str) -> None:
    """Put every input in the same page-cache state before each timed run, floor and merges alike: ``warm``
    reads each once; ``cold`` evicts them (``posix_fadvise(DONTNEED)`` drops a file's clean pages without
    root), so the run reads from the disk."""
    if cache == "warm":
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
        return
    os.sync()  # only clean pages can be dropped
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_measured(cmd: list[str], threads: int | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall time, its own peak RSS (os.wait4, not the max over all children) and the JSON it
    printed last."""
    start = time.perf_counter()
    # mergekit has no thread flag of its own for its torch ops: give it the same budget through the environment.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    result["process_s"] = wall
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def time_floor(files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def fishmerge_cmd(root: Path, method: str, out: Path, block_bytes: int | None, threads: int | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--child-root", str(root),
           "--child-out", str(out)]
    cmd += ["--block-bytes", str(block_bytes)] if block_bytes else []
    return cmd + (["--threads", str(threads)] if threads else [])


def mergekit_cmd(mergekit: str, root: Path, out: Path) -> list[str]:
    config = root / "mergekit-linear.yml"
    lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
    for i in range(N_MODELS):
        lines += [f"  - model: {root / f'model-{i}'}", "    parameters:", "      weight: 1.0"]
    config.write_text("\n".join(lines) + "\n")
    return [mergekit, str(config), str(out), "--quiet"]


def child(method: str, root: Path, out: Path, block_bytes: int | None, threads: int | None) -> None:
    """One merge in this process; prints its in-process time and the bytes it read as JSON."""
    import torch

    from fishmerge.merge import DEFAULT_BLOCK_BYTES, execute_merge, plan_merge

    if threads:
        torch.set_num_threads(threads)

    start = time.perf_counter()
    models = [{"model": str(root / f"model-{i}")} for i in range(N_MODELS)]
    if method == "fisher":
        for i, entry in enumerate(models):
            entry["fisher"] = str(root / f"fisher-{i}")
    plan = plan_merge({"method": method, "models": models, "weights": "uniform"})
    execute_merge(plan, out, block_bytes=block_bytes or DEFAULT_BLOCK_BYTES)
    merge_s = time.perf_counter() - start
    stores = [c.store for c in plan.checkpoints] + [f.store for f in plan.fishers or []]
    io = _proc_io()
    print(json.dumps({"merge_s": merge_s, "bytes_read": sum(s.bytes_read for s in stores),
                      "rchar": io.get("rchar"), "storage_read_bytes": io.get("read_bytes")}))


def _proc_io() -> dict[str, int]:
    try:
        pairs = (line.split(":") for line in Path("/proc/self/io").read_text().splitlines())
        return {k.strip(): int(v) for k, v in pairs}
    except OSError:
        return {}


def bench_size(root: Path, size: str, repeats: int, mergekit: str | None, block_bytes: int | None,
               methods: list[str], threads: int | None, cache: str) -> list[dict[str, Any]]:
    rows = []
    out = root.parent / f"out-{size}"
    params = param_count(root)
    for method in methods:
        files = input_files(root, with_fishers=method == "fisher")
        total = sum(f.stat().st_size for f in files)
        runs, floors = _timed(fishmerge_cmd(root, method, out, block_bytes, threads), files, out, repeats, threads,
                              cache)
        rows.append(_row(size, params, f"fishmerge {method}", runs, floors, total))
        if method == "average" and mergekit:
            rows.append(_mergekit_row(root, size, params, mergekit, repeats, files, total, out, threads, cache))
    return rows


def _timed(command: list[str], files: list[Path], out: Path, repeats: int, threads: int | None,
           cache: str) -> tuple[list[dict[str, Any]], list[float]]:
    """Each repeat: the I/O floor, then the merge, both from the same page-cache state."""
    runs, floors = [], []
    for _ in range(repeats):
        prepare_cache(files, cache)
        floors.append(time_floor(files))
        shutil.rmtree(out, ignore_errors=True)
        prepare_cache(files, cache)
        runs.append(run_measured(command, threads))
        shutil.rmtree(out, ignore_errors=True)
    return runs, floors


def _mergekit_row(root: Path, size: str, params: int, mergekit: str, repeats: int, files: list[Path],
                  total: int, out: Path, threads: int | None, cache: str) -> dict[str, Any]:
    runs, floors = _timed(mergekit_cmd(mergekit, root, out), files, out, repeats, threads, cache)
    for run in runs:  # mergekit reports nothing itself: its whole process is the merge
        run["merge_s"] = run["process_s"]
    return _row(size, params, "mergekit linear", runs, floors, total)


def _row(size: str, params: int, what: str, runs: list[dict[str, Any]], floors: list[float],
         input_bytes: int) -> dict[str, Any]:
    merge_s = median([r["merge_s"] for r in runs])
    floor = median(floors)
    read = runs[0].get("bytes_read")
    return {
        "size": size,
        "params_M": round(params / 1e6, 1),
        "merge": what,
        "input_GB": round(input_bytes / 1e9, 3),
        "bytes_read_GB": round(read / 1e9, 3) if read else None,
        "merge_s": merge_s,
        "process_s": median([r["process_s"] for r in runs]),
        "GB_per_s": input_bytes / 1e9 / merge_s,
        "floor_s": floor,
        "x_floor": merge_s / floor,
        "peak_rss_MiB": max(r["peak_rss_mib"] for r in runs),
        "runs_merge_s": [round(r["merge_s"], 3) for r in runs],
        "runs_floor_s": [round(f, 3) for f in floors],
    }


CACHE_STATES = {
    "warm": "every input read once with cat before each timed run",
    "cold": "every input evicted from the page cache (posix_fadvise DONTNEED) before each timed run",
}
COLUMNS = ["size", "params_M", "merge", "input_GB", "bytes_read_GB", "merge_s", "process_s", "GB_per_s",
           "floor_s", "x_floor", "peak_rss_MiB"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fishmerge-bench"))
    parser.add_argument("--sizes", default="small,0.5b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--methods", default="fisher,average")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", default=DEFAULT_MERGEKIT,
                        help="mergekit-yaml executable (from a separate venv); 'none' to skip")
    parser.add_argument("--block-bytes", type=int, default=None, help="override the merge's row-block size")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of each merge (default: torch's own choice, one per core)")
    parser.add_argument("--cache", choices=sorted(CACHE_STATES), default="warm",
                        help="page-cache state of the inputs before every timed run: " +
                        "; ".join(f"{k}: {v}" for k, v in CACHE_STATES.items()))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/merge_io.json"))
    parser.add_argument("--clean", action="store_true", help="delete the built inputs afterwards")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.child_root, args.child_out, args.block_bytes, args.threads)
        return 0
    mergekit = None if args.mergekit == "none" else args.mergekit
    if mergekit and not Path(mergekit).exists():
        print(f"mergekit not found at {mergekit}: its row is skipped (see benchmarks/README.md)")
        mergekit = None
    rows = []
    for size in args.sizes.split(","):
        root = build_size(args.workdir, size)
        rows += bench_size(root, size, args.repeats, mergekit, args.block_bytes, args.methods.split(","),
                           args.threads, args.cache)
    print_table(rows, COLUMNS)
    write_json(args.json, {"benchmark": "merge_io", "machine": machine(), "repeats": args.repeats,
                           "cache": CACHE_STATES[args.cache],
                           "block_bytes": args.block_bytes, "threads": args.threads, "rows": rows})
    if args.clean:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
