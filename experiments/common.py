"""Shared helpers of the experiments: run many federated configs in parallel processes, read their results."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

STACKEXCHANGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "stackexchange"


def _single_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    import logging

    logging.getLogger("fishmerge").setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")


def run_task(name: str, config: dict) -> tuple[str, float, str | None]:
    """Run one federated config (a dict for FederatedConfig) unless its output is already complete."""
    from fishmerge.federated.config import FederatedConfig
    from fishmerge.federated.driver import run_federated

    out = Path(config["output_dir"])
    if (out / "final").is_dir() and (out / "metrics.jsonl").is_file():
        return name, 0.0, None
    if out.exists():  # an interrupted run: start it again from scratch (runs are short)
        shutil.rmtree(out)
    started = time.perf_counter()
    try:
        run_federated(FederatedConfig.model_validate(config))
    except Exception:  # noqa: BLE001 - reported, the sweep goes on
        return name, time.perf_counter() - started, traceback.format_exc()
    seconds = time.perf_counter() - started
    (out / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    return name, seconds, None


def prepare(config: dict) -> None:
    """Build a config's data cache and pretrained model once, before parallel runs would race to build them."""
    from fishmerge.federated.config import FederatedConfig
    from fishmerge.federated.data import load_federated_data
    from fishmerge.federated.models import pretrained_folder

    parsed = FederatedConfig.model_validate(config)
    tokenizer = None
    if parsed.model.path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(parsed.model.path)
    cache = Path(parsed.cache_dir)
    data = load_federated_data(parsed.data, cache, tokenizer)
    pretrained_folder(parsed, data.tokenizer, cache)


def run_all(tasks: Sequence[tuple[str, dict]], workers: int, log=print) -> dict[str, float]:
    """Run ``tasks`` (in order of priority) on ``workers`` single-threaded processes; return wall seconds."""
    seconds: dict[str, float] = {}
    if not tasks:
        return seconds
    _single_thread()
    done = set()
    for _, config in tasks:  # one build per distinct (data, model) setting
        key = json.dumps([config["data"], config["model"], config.get("cache_dir")], sort_keys=True, default=str)
        if key not in done:
            prepare(config)
            done.add(key)
    if workers <= 1:
        results = (run_task(n, c) for n, c in tasks)
        for name, took, error in results:
            _report(name, took, error, seconds, log)
        return seconds
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_thread) as pool:
        futures = [pool.submit(run_task, n, c) for n, c in tasks]
        for future in as_completed(futures):
            name, took, error = future.result()
            _report(name, took, error, seconds, log)
    return seconds


def _report(name: str, took: float, error: str | None, seconds: dict, log) -> None:
    if error:
        log(f"FAILED {name}:\n{error}")
    else:
        seconds[name] = took
        log(f"done {name} in {took:.1f} s")


def read_run(out: Path) -> dict | None:
    """The numbers of a finished run: last-round eval metrics, CSB over rounds, personalization summary."""
    metrics_path = Path(out) / "metrics.jsonl"
    if not metrics_path.is_file() or not (Path(out) / "final").is_dir():
        return None
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    last = rows[-1]
    csb = [r["csb_loss"] for r in rows if r.get("csb_loss") is not None]
    csb_acc = [r["csb_accuracy"] for r in rows if r.get("csb_accuracy") is not None]
    result = {
        "eval_loss": last.get("eval_loss"),
        "eval_accuracy": last.get("eval_accuracy"),
        "eval_accuracy_no_oov_eos": last.get("eval_accuracy_no_oov_eos"),
        "csb_loss_mean": statistics.fmean(csb) if csb else None,
        "csb_accuracy_mean": statistics.fmean(csb_acc) if csb_acc else None,
        "skipped_clients": sum(len(r.get("skipped", [])) for r in rows),
        "curve_eval_loss": [r.get("eval_loss") for r in rows],
        "curve_csb_loss": [r.get("csb_loss") for r in rows],
    }
    summary_path = Path(out) / "personalization" / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        for key in ("pre_loss", "post_loss", "delta_loss", "pre_accuracy", "post_accuracy", "delta_accuracy",
                    "post_accuracy_no_oov_eos"):
            if key in summary:
                result[f"pers_{key}"] = summary[key]["mean"]
    wall = Path(out) / "wall_seconds.txt"
    result["wall_seconds"] = float(wall.read_text()) if wall.is_file() else None
    return result


def paired(values_a: Sequence[float], values_b: Sequence[float]) -> dict | None:
    """Mean, std, min and max over seeds of the paired difference a − b."""
    diffs = [a - b for a, b in zip(values_a, values_b) if a is not None and b is not None]
    if not diffs:
        return None
    return {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "min": min(diffs), "max": max(diffs), "n": len(diffs)}


def mean_std(values: Sequence[float | None]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def all_finite(obj) -> bool:
    """True if every float inside ``obj`` (nested dicts/lists) is finite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(all_finite(v) for v in obj)
    return True
