"""Federated benchmark: wall time per round of FedFish against FedAvg, and clients per second with 1 and 2 processes.

Every run is `fishmerge federate` on the same config (the embedded synthetic users and a small pretrained Llama,
cached first so no run pays for building them), with personalization off. A round's time is the `seconds` field
of its metrics line: client training, the Fisher (FedFish), aggregation, the Client-Server Barrier pass and the
held-out evaluation (every round here); checkpointing is outside it. The first round of each run is dropped
(warm-up); the rest of every repeat give a median.

    python benchmarks/federated.py --workdir /tmp/fmfed --rounds 6 --clients 8 --examples 64 --local-epochs 1,2,8 \
        --fisher-max-examples 16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, print_table, write_json  # noqa: E402


def run_config(args: argparse.Namespace, cache: Path, local_epochs: int, fisher_examples: int | None = None) -> dict:
    return {
        "fisher": {"max_examples": fisher_examples},
        "model": {"new": {"hidden_size": args.hidden, "layers": args.layers, "heads": 4}},
        "data": {"max_examples_per_client": args.examples, "eval_clients": 10},
        "rounds": args.rounds,
        "clients_per_round": args.clients,
        "local_epochs": local_epochs,
        "personalization": {"enabled": False},
        "cache_dir": str(cache),
    }


def federate(config_file: Path, out: Path, aggregator: str, processes: int, threads: int) -> dict:
    """One run in its own process group; returns its per-round seconds and the whole run's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = ["-m", "fishmerge", "federate", "--config", str(config_file), "--output-dir", str(out),
               "--aggregator", aggregator]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *command]
    started = time.perf_counter()
    subprocess.run([sys.executable, *command], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"round_seconds": [r["seconds"] for r in rows], "wall_s": wall, "clients": sum(len(r["clients"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fishmerge-federated-bench"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--local-epochs", default="1,2,8", help="comma-separated E values")
    parser.add_argument("--examples", type=int, default=32, help="examples per client")
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, taking turns")
    parser.add_argument("--fisher-max-examples", type=int, default=None,
                        help="also time FedFish with fisher.max_examples set to this (a subsample per client)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/federated.json"))
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for epochs in (int(e) for e in args.local_epochs.split(",")):
        configs = {}
        for variant, examples in (("full", None), ("subsample", args.fisher_max_examples)):
            if variant == "full" or examples:
                configs[variant] = args.workdir / f"run-e{epochs}-{variant}.yaml"
                configs[variant].write_text(yaml.safe_dump(run_config(args, args.workdir / "cache", epochs, examples)))
        # Build the data and the pretrained model once, outside every timed run.
        federate(configs["full"], args.workdir / f"warmup-{time.time_ns()}", "fedavg", 1, 1)
        runs = [("fedavg", "full"), ("fedfish", "full")]
        if "subsample" in configs:
            runs.append(("fedfish", "subsample"))
        by = {}
        for processes in (1, 2):
            # Repeats take turns (A B C A B C ...), so a burst of other work on the machine slows every variant.
            steady: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
            walls: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
            for _ in range(args.repeats):
                for aggregator, variant in runs:
                    out = args.workdir / f"{aggregator}-{variant}-p{processes}-e{epochs}-{time.time_ns()}"
                    result = federate(configs[variant], out, aggregator, processes, threads=1)
                    steady[aggregator, variant] += result["round_seconds"][1:] or result["round_seconds"]
                    walls[aggregator, variant].append(result["wall_s"])
            for aggregator, variant in runs:
                per_round = median(steady[aggregator, variant])
                by[aggregator, variant, processes] = {
                    "aggregator": aggregator, "fisher_examples": "all" if variant == "full" or aggregator == "fedavg"
                    else args.fisher_max_examples, "processes": processes, "rounds": args.rounds,
                    "repeats": args.repeats, "clients_per_round": args.clients, "local_epochs": epochs,
                    "s_per_round": per_round, "clients_per_s": args.clients / per_round,
                    "run_wall_s": median(walls[aggregator, variant]), "round_seconds": steady[aggregator, variant]}
            for aggregator, variant in runs[1:]:
                by[aggregator, variant, processes]["fedfish_over_fedavg"] = (
                    by[aggregator, variant, processes]["s_per_round"] / by["fedavg", "full", processes]["s_per_round"])
        rows += by.values()
    print_table(rows, ["local_epochs", "aggregator", "fisher_examples", "processes", "clients_per_round", "s_per_round",
                       "clients_per_s", "fedfish_over_fedavg", "run_wall_s"])
    write_json(args.json, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
