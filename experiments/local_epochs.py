"""Local-epochs sweep: FedFish against FedAvg as clients train longer, crossed with the client learning rate.

The paper's claim (Dhawan et al., TMLR 2024, arXiv 2311.10291): FedFish's advantage over FedAvg grows with the
number of local epochs E. How far a client moves in a round depends on lr × E, not on E alone, so this sweeps
both: E ∈ {1, 2, 4, 8, 16} × client lr (SGD) ∈ ``--lrs``, with paired seeds (the same seed gives both
aggregators the same initial model, the same clients each round and the same per-client shuffles).

Data sets (each with a small Llama pretrained centrally on the synthetic generator's general text, i.e.
``model.new`` + ``model.pretrain``, cached per data set because the vocabulary differs):

* ``synthetic``: the embedded Stack-Overflow-like users (topic mixes, personal phrasing).
* ``beer`` (or any ``<site>`` with ``<site>.Posts.xml`` under ``../shared/data/stackexchange``): per-user
  clients converted from a Stack Exchange data-dump sample (``data.source: posts_xml``); the word vocabulary is
  built from that file's train split, so the pretrained model is built with that tokenizer.

Variants per (data set, E, lr, seed): ``fedavg`` and ``fedfish`` (server SGD, lr 1: the plain round of SPEC §3),
two FedAvg controls for the size of the aggregated step — FedFish's aggregate is larger than FedAvg's,
since a coordinate that only one client's Fisher informs takes that client's update whole instead of 1/m of it:
``fedavg_slr2`` (server SGD lr 2) and ``fedavg_adam`` (server Adam, lr ``--adam-lr``); and ``fedfish_damped``,
FedFish with damping δ = 1e-2 instead of 1e-6, which tests whether the coordinates with a near-zero Fisher
(rare words) are what helps or hurts. The controls run at ``--control-epochs`` only.

Metrics per run: held-out cross-entropy (primary), accuracy, accuracy without OOV/EOS after the last round,
Client-Server Barrier (mean over rounds), personalization (SPEC §4) pre/post on test clients.

Run: ``python experiments/local_epochs.py --out DIR`` (about an hour on 2 CPU cores; ``--quick``: under two
minutes). Writes ``DIR/runs/<name>/`` (the federated runs), ``DIR/local_epochs.json`` (every run's numbers and
the paired differences), ``DIR/local_epochs_table.md`` and ``DIR/local_epochs_<data>.png``. Runs whose output
is complete are skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import STACKEXCHANGE, all_finite, mean_std, paired, read_run, run_all  # noqa: E402

METRICS = ("eval_loss", "eval_accuracy", "eval_accuracy_no_oov_eos", "csb_loss_mean", "pers_post_accuracy",
           "pers_delta_accuracy", "pers_post_loss")
VARIANTS = {
    "fedavg": {"aggregator": "fedavg"},
    "fedfish": {"aggregator": "fedfish"},
    "fedavg_slr2": {"aggregator": "fedavg", "server": {"optimizer": "sgd", "lr": 2.0}},
    "fedavg_adam": {"aggregator": "fedavg", "server": {"optimizer": "adam", "lr": None}},
    # FedFish with δ = 1e-2 (about the mean client Fisher value) instead of 1e-6: coordinates that a client's
    # Fisher barely informs (a quarter to a half of them are exactly 0 at a client) lean towards FedAvg.
    "fedfish_damped": {"aggregator": "fedfish", "fisher": {"estimator": "empirical", "damping": 1e-2, "batch_size": 32}},
}


def data_spec(name: str, args) -> dict:
    common = {"max_examples_per_client": args.max_examples, "eval_clients": args.eval_clients, "seed": 0}
    if name == "synthetic":
        return {"source": "synthetic", "train_users": args.train_users, "heldout_users": 20, "test_users": 20,
                **common}
    path = Path(os.environ.get("FISHMERGE_STACKEXCHANGE", STACKEXCHANGE)) / f"{name}.Posts.xml"
    return {"source": "posts_xml", "path": str(path), "vocab_size": args.posts_vocab, "min_examples": 5, **common}


def base_config(dataset: str, args) -> dict:
    return {
        "model": {"new": {"hidden_size": args.hidden, "layers": args.layers, "heads": 4, "max_positions": 32},
                  "pretrain": {"sentences": args.pretrain_sentences, "epochs": 2, "lr": 3e-3, "batch_size": 32}},
        "data": data_spec(dataset, args),
        "rounds": args.rounds,
        "clients_per_round": args.clients,
        "client": {"optimizer": "sgd", "lr": 0.1, "batch_size": 8},
        "fisher": {"estimator": "empirical", "damping": 1e-6, "batch_size": 32},
        "eval": {"every": 1, "split": "heldout"},
        "personalization": {"enabled": True, "split": "test", "fraction": 0.8, "epochs": 1,
                            "max_steps": args.personalization_steps},
        "keep_checkpoints": 1,
        "cache_dir": str(args.out / "cache"),
    }


def run_name(dataset: str, variant: str, epochs: int, lr: float, seed: int) -> str:
    return f"{dataset}-{variant}-E{epochs}-lr{lr:g}-s{seed}"


def build_tasks(args) -> list[tuple[str, dict]]:
    """Every run, in priority order: seed by seed, the two main aggregators before the controls."""
    tasks = []
    groups = [["fedavg", "fedfish"], [v for v in args.controls]]
    for group in groups:
        for seed in args.seeds:
            for dataset in args.datasets:
                for lr in args.lrs:
                    for epochs in sorted(args.epochs, reverse=True):  # long runs first: better packing
                        for variant in group:
                            if variant in args.controls and args.control_epochs and epochs not in args.control_epochs:
                                continue
                            config = base_config(dataset, args)
                            spec = json.loads(json.dumps(VARIANTS[variant]))
                            if spec.get("server", {}).get("lr", 0) is None:
                                spec["server"]["lr"] = args.adam_lr
                            config |= spec
                            config["local_epochs"] = epochs
                            config["client"]["lr"] = lr
                            config["seed"] = seed
                            name = run_name(dataset, variant, epochs, lr, seed)
                            config["output_dir"] = str(args.out / "runs" / name)
                            tasks.append((name, config))
    return tasks


def summarize(args) -> dict:
    runs = {}
    for name, config in build_tasks(args):
        result = read_run(Path(config["output_dir"]))
        if result is not None:
            runs[name] = result
    cells = []
    for dataset in args.datasets:
        for lr in args.lrs:
            for epochs in args.epochs:
                cell: dict = {"data": dataset, "lr": lr, "epochs": epochs, "lr_x_epochs": lr * epochs}
                for variant in ["fedavg", "fedfish", *args.controls]:
                    got = [runs.get(run_name(dataset, variant, epochs, lr, s)) for s in args.seeds]
                    cell[variant] = {m: mean_std([g.get(m) if g else None for g in got]) for m in METRICS}
                fish = [runs.get(run_name(dataset, "fedfish", epochs, lr, s)) for s in args.seeds]
                for other in ["fedavg", *args.controls]:
                    base = [runs.get(run_name(dataset, other, epochs, lr, s)) for s in args.seeds]
                    ok = [(f, b) for f, b in zip(fish, base) if f and b]
                    cell[f"fedfish_minus_{other}"] = {
                        m: paired([f.get(m) for f, _ in ok], [b.get(m) for _, b in ok]) for m in METRICS}
                cells.append(cell)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    walls = [r["wall_seconds"] for r in runs.values() if r.get("wall_seconds")]
    return {"settings": settings, "runs_complete": len(runs), "runs_planned": len(build_tasks(args)),
            "total_run_seconds": sum(walls), "cells": cells,
            "runs": {k: {m: v for m, v in r.items()} for k, r in runs.items()}}


def fmt(d: dict | None, digits: int = 3, sign: bool = True) -> str:
    if not d:
        return "–"
    s = "+" if sign else ""
    return f"{d['mean']:{s}.{digits}f} [{d['min']:{s}.{digits}f}, {d['max']:{s}.{digits}f}]"


def markdown_table(summary: dict) -> str:
    lines = []
    controls = summary["settings"]["controls"]
    header = ("| data | E | lr | lr×E | FedAvg loss | FedFish loss | Fish − Avg loss | Fish − Avg acc | "
              "Fish − Avg pers. post acc | Fish − Avg CSB |" + "".join(f" Fish − {c} loss |" for c in controls))
    lines += [header, "|" + "---|" * (10 + len(controls))]
    for c in summary["cells"]:
        avg, fish = c["fedavg"]["eval_loss"], c["fedfish"]["eval_loss"]
        d = c["fedfish_minus_fedavg"]
        row = (f"| {c['data']} | {c['epochs']} | {c['lr']:g} | {c['lr_x_epochs']:g} | "
               f"{avg['mean']:.3f} ± {avg['std']:.3f} | " if avg else f"| {c['data']} | {c['epochs']} | {c['lr']:g} | "
               f"{c['lr_x_epochs']:g} | – | ")
        row += f"{fish['mean']:.3f} ± {fish['std']:.3f} | " if fish else "– | "
        row += f"{fmt(d['eval_loss'])} | {fmt(d['eval_accuracy'], 4)} | {fmt(d['pers_post_accuracy'], 4)} | "
        row += f"{fmt(d['csb_loss_mean'])} |"
        row += "".join(f" {fmt(c[f'fedfish_minus_{k}']['eval_loss'])} |" for k in controls)
        lines.append(row)
    lines.append("")
    lines.append("Differences are paired by seed (FedFish run − other run with the same seed): mean [min, max] over "
                 f"seeds {summary['settings']['seeds']}. Loss = held-out token cross-entropy after the last round "
                 "(lower is better); acc = held-out next-token accuracy; pers. post acc = mean over test clients of "
                 "the accuracy after personalization; CSB = client-server barrier (loss), mean over rounds.")
    return "\n".join(lines)


def personalization_table(summary: dict) -> str:
    """FedFish − FedAvg after personalization and without OOV/EOS, plus each aggregator's personalization gain."""
    lines = ["| data | lr | E | Fish − Avg pers. post loss | Fish − Avg pers. post acc | "
             "Fish − Avg held-out acc (no OOV/EOS) | FedAvg pers. gain in acc (post − pre) | FedFish pers. gain |",
             "|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        d = c["fedfish_minus_fedavg"]

        def gain(variant: str) -> str:
            value = c[variant]["pers_delta_accuracy"]
            return f"{value['mean']:+.4f}" if value else "–"

        lines.append(f"| {c['data']} | {c['lr']:g} | {c['epochs']} | {fmt(d['pers_post_loss'])} | "
                     f"{fmt(d['pers_post_accuracy'], 4)} | {fmt(d['eval_accuracy_no_oov_eos'], 4)} | "
                     f"{gain('fedavg')} | {gain('fedfish')} |")
    return "\n".join(lines)


def plot(summary: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    panels = [("eval_loss", "Δ held-out loss (Fish − Avg)"), ("eval_accuracy", "Δ held-out accuracy"),
              ("pers_post_accuracy", "Δ post-personalization acc."), ("csb_loss_mean", "Δ CSB (loss, mean)")]
    for dataset in summary["settings"]["datasets"]:
        cells = [c for c in summary["cells"] if c["data"] == dataset]
        fig, axes = plt.subplots(2, 3, figsize=(11, 6), constrained_layout=True)
        lrs = summary["settings"]["lrs"]
        colors = plt.cm.viridis([i / max(1, len(lrs) - 1) * 0.85 for i in range(len(lrs))])
        # Top left: absolute held-out loss of every variant against E, one colour per lr.
        axis = axes[0][0]
        styles = {"fedavg": ("--", "o"), "fedfish": ("-", "s"), "fedavg_slr2": (":", "^"), "fedavg_adam": ("-.", "v"),
                  "fedfish_damped": ("-", "D")}
        for lr, color in zip(lrs, colors):
            for variant, (ls, marker) in styles.items():
                points = [(c["epochs"], c[variant]["eval_loss"]["mean"]) for c in cells
                          if c["lr"] == lr and c.get(variant) and c[variant]["eval_loss"]]
                if points:
                    axis.plot(*zip(*sorted(points)), ls=ls, marker=marker, ms=3, color=color,
                              label=f"{variant} lr {lr:g}")
        axis.set_xscale("log", base=2)
        axis.set_title("held-out loss (mean over seeds)", fontsize=9)
        axis.set_xlabel("local epochs E")
        axis.legend(fontsize=5, ncol=2)
        for axis, (metric, title) in zip([axes[0][1], axes[0][2], axes[1][0], axes[1][1]], panels):
            for lr, color in zip(lrs, colors):
                pts = sorted((c["epochs"], c["fedfish_minus_fedavg"][metric]) for c in cells
                             if c["lr"] == lr and c["fedfish_minus_fedavg"][metric])
                if not pts:
                    continue
                x = [p[0] for p in pts]
                y = [p[1]["mean"] for p in pts]
                err = [[p[1]["mean"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["mean"] for p in pts]]
                axis.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, color=color, label=f"lr {lr:g}")
            axis.axhline(0, color="gray", lw=0.8)
            axis.set_xscale("log", base=2)
            axis.set_title(title, fontsize=9)
            axis.set_xlabel("local epochs E")
            axis.legend(fontsize=6)
        # Bottom right: FedFish − control, held-out loss, against lr × E.
        axis = axes[1][2]
        for other, marker in (("fedavg", "o"), *[(c, m) for c, m in zip(summary["settings"]["controls"], "^vD")]):
            pts = sorted((c["lr_x_epochs"], c[f"fedfish_minus_{other}"]["eval_loss"]) for c in cells
                         if c.get(f"fedfish_minus_{other}") and c[f"fedfish_minus_{other}"]["eval_loss"])
            if pts:
                axis.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                              yerr=[[p[1]["mean"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["mean"] for p in pts]],
                              marker=marker, ms=3, capsize=2, ls="none", label=f"Fish − {other}")
        axis.axhline(0, color="gray", lw=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("client lr × E")
        axis.set_title("Δ held-out loss against lr × E", fontsize=9)
        axis.legend(fontsize=6)
        fig.suptitle(f"{dataset}: FedFish − FedAvg, paired seeds {summary['settings']['seeds']} "
                     "(mean, bars = min/max)", fontsize=10)
        path = out_dir / f"local_epochs_{dataset}.png"
        fig.savefig(path, dpi=65)
        plt.close(fig)
        figures.append(path)
    return figures


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "beer"])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05, 0.3])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controls", nargs="*", default=["fedavg_slr2", "fedavg_adam", "fedfish_damped"],
                        choices=["fedavg_slr2", "fedavg_adam", "fedfish_damped"])
    parser.add_argument("--control-epochs", type=int, nargs="*", default=[1, 4],
                        help="E values at which the controls run (empty: all)")
    parser.add_argument("--adam-lr", type=float, default=0.01, help="server Adam lr of the fedavg_adam control")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=6, help="clients per round")
    parser.add_argument("--max-examples", type=int, default=32, help="max_examples_per_client")
    parser.add_argument("--eval-clients", type=int, default=10)
    parser.add_argument("--train-users", type=int, default=100, help="synthetic train users")
    parser.add_argument("--posts-vocab", type=int, default=2000, help="vocabulary size of posts_xml data")
    parser.add_argument("--hidden", type=int, default=48)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--pretrain-sentences", type=int, default=4000)
    parser.add_argument("--personalization-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--summarize-only", action="store_true", help="only read finished runs and write results")
    parser.add_argument("--quick", action="store_true", help="a smoke test: synthetic, E 1 and 2, 2 seeds, tiny")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets, args.epochs, args.lrs, args.seeds = ["synthetic"], [1, 2], [0.1], [0, 1]
        args.controls, args.rounds, args.clients, args.max_examples = ["fedavg_slr2"], 2, 3, 16
        args.control_epochs = []
        args.eval_clients, args.train_users, args.hidden, args.pretrain_sentences = 4, 20, 16, 200
        args.personalization_steps = 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.summarize_only:
        tasks = build_tasks(args)
        print(f"{len(tasks)} runs on {args.workers} workers", flush=True)
        run_all(tasks, args.workers, log=lambda s: print(s, flush=True))
    summary = summarize(args)
    summary["sweep_wall_seconds"] = time.perf_counter() - started
    if not all_finite(summary["cells"]):
        print("warning: some summary values are not finite", flush=True)
    (args.out / "local_epochs.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "local_epochs_table.md").write_text(markdown_table(summary) + "\n\n" + personalization_table(summary)
                                                    + "\n")
    figures = plot(summary, args.out)
    print(markdown_table(summary))
    print(f"{summary['runs_complete']}/{summary['runs_planned']} runs complete; figures: "
          + ", ".join(str(f) for f in figures))
    return summary


if __name__ == "__main__":
    main()
