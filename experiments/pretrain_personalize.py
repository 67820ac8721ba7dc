"""Federated pretraining on one corpus, then personalization on the users of another: FedFish against FedAvg.

The paper (Dhawan et al., TMLR 2024, arXiv 2311.10291) pretrains federatedly on one corpus and reports that
FedFish's global model personalizes better on the clients of another. Here, offline and small:

1. Stage 1 (federated pretraining): ``fishmerge federate`` on per-user clients of one Stack Exchange sample
   (``--pretrain-site``, default matheducators; ``data.source: posts_xml``), starting from a small Llama that
   was pretrained centrally on the synthetic generator's general text with that sample's word vocabulary;
   FedAvg and FedFish, paired seeds, at each ``--epochs`` value.
2. Stage 2 (personalization on another corpus): the users of a second sample (``--target-site``, default ai)
   read through stage 1's tokenizer (the checkpoint's; words outside its vocabulary are OOV). For each of the
   target's test clients (SPEC §4): evaluate the global model on the last 20 % of the client's posts (pre),
   fine-tune a copy on the first 80 % with the client optimizer, evaluate again (post), using the project's
   ``personalize_client`` and ``summarize``. The same is done for the starting model (no federated
   pretraining) as a reference.

Run: ``python experiments/pretrain_personalize.py --out DIR`` (``--quick``: a smoke test). Writes
``DIR/runs/...``, ``DIR/pretrain_personalize.json``, ``DIR/pretrain_personalize_table.md`` and
``DIR/pretrain_personalize.png``.
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

PERS_KEYS = ("pre_loss", "post_loss", "delta_loss", "pre_accuracy", "post_accuracy", "delta_accuracy",
             "pre_accuracy_no_oov_eos", "post_accuracy_no_oov_eos")


def site_path(site: str) -> str:
    return str(Path(os.environ.get("FISHMERGE_STACKEXCHANGE", STACKEXCHANGE)) / f"{site}.Posts.xml")


def stage1_config(args, aggregator: str, epochs: int, seed: int) -> dict:
    return {
        "model": {"new": {"hidden_size": args.hidden, "layers": args.layers, "heads": 4, "max_positions": 32},
                  "pretrain": {"sentences": args.pretrain_sentences, "epochs": 2, "lr": 3e-3, "batch_size": 32}},
        "data": {"source": "posts_xml", "path": site_path(args.pretrain_site), "vocab_size": args.vocab,
                 "min_examples": 5, "max_examples_per_client": args.max_examples, "eval_clients": args.eval_clients,
                 "seed": 0},
        "rounds": args.rounds,
        "clients_per_round": args.clients,
        "local_epochs": epochs,
        "client": {"optimizer": "sgd", "lr": args.lr, "batch_size": 8},
        "aggregator": aggregator,
        "fisher": {"estimator": "empirical", "damping": 1e-6, "batch_size": 32},
        "personalization": {"enabled": True, "split": "test", "epochs": args.personalization_epochs},
        "seed": seed,
        "keep_checkpoints": 1,
        "output_dir": str(args.out / "runs" / f"{args.pretrain_site}-{aggregator}-E{epochs}-s{seed}"),
        "cache_dir": str(args.out / "cache"),
    }


def personalize_on_target(model_dir: Path, args, seed: int) -> dict:
    """Personalization (SPEC §4) of the checkpoint ``model_dir`` on the target site's test clients."""
    import torch
    from transformers import AutoTokenizer

    from fishmerge.federated.config import FederatedConfig
    from fishmerge.federated.data import load_federated_data
    from fishmerge.federated.driver import derived_seed
    from fishmerge.federated.models import load_global_model, trainable
    from fishmerge.federated.personalize import personalize_client, summarize

    config = FederatedConfig.model_validate({
        "model": {"path": str(model_dir)},
        "data": {"source": "posts_xml", "path": site_path(args.target_site), "min_examples": 5,
                 "eval_clients": args.target_clients, "seed": 0},
        "client": {"optimizer": "sgd", "lr": args.lr, "batch_size": 8},
        "personalization": {"enabled": True, "split": "test", "epochs": args.personalization_epochs},
        "seed": seed,
        "cache_dir": str(args.out / "cache"),
    })
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_federated_data(config.data, Path(config.cache_dir), tokenizer)
    model = load_global_model(model_dir, "float32", None, torch.device("cpu"))
    params = trainable(model)
    global_state = {name: p.detach().clone() for name, p in params.items()}
    rows = []
    for i, client in enumerate(data.eval_clients["test"]):
        row = personalize_client(model, params, global_state, data.sequences("test", client), config,
                                 client_id=client, seed=derived_seed(seed, i, 3), pad_id=tokenizer.pad_token_id,
                                 exclude_ids=data.exclude_ids)
        if row is not None:
            rows.append(row)
    return summarize(rows)


def target_task(model_dir: str, args, seed: int, out_file: str) -> dict:
    import torch

    torch.set_num_threads(1)
    path = Path(out_file)
    if path.is_file():
        return json.loads(path.read_text())
    summary = personalize_on_target(Path(model_dir), args, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-site", default="matheducators")
    parser.add_argument("--target-site", default="ai")
    parser.add_argument("--epochs", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--lr", type=float, default=0.1, help="client SGD lr (stage 1 and personalization)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-examples", type=int, default=32)
    parser.add_argument("--eval-clients", type=int, default=10)
    parser.add_argument("--target-clients", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=48)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--pretrain-sentences", type=int, default=4000)
    parser.add_argument("--personalization-epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 round, E 1, 1 seed, tiny model")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.rounds, args.clients, args.max_examples = [1], [0], 1, 2, 8
        args.eval_clients, args.target_clients, args.hidden, args.pretrain_sentences = 3, 3, 16, 100
        args.personalization_epochs, args.vocab = 1, 500
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = []
    for seed in args.seeds:
        for epochs in sorted(args.epochs, reverse=True):
            for aggregator in ("fedavg", "fedfish"):
                config = stage1_config(args, aggregator, epochs, seed)
                tasks.append((Path(config["output_dir"]).name, config))
    run_all(tasks, args.workers, log=lambda s: print(s, flush=True))
    stage1_seconds = time.perf_counter() - started

    # Stage 2, sequentially (each is seconds): every finished stage-1 model, and the common starting model.
    from fishmerge.federated.config import FederatedConfig
    from fishmerge.federated.data import load_federated_data
    from fishmerge.federated.models import pretrained_folder

    first = FederatedConfig.model_validate(tasks[0][1])
    start_model = pretrained_folder(first, load_federated_data(first.data, Path(first.cache_dir)).tokenizer,
                                    Path(first.cache_dir))
    results: dict = {"start_model": {}, "runs": {}}
    for seed in args.seeds:
        results["start_model"][str(seed)] = target_task(str(start_model), args, seed,
                                                        str(args.out / "target" / f"start-s{seed}.json"))
    for name, config in tasks:
        run = read_run(Path(config["output_dir"]))
        if run is None:
            continue
        target = target_task(str(Path(config["output_dir"]) / "final"), args, config["seed"],
                             str(args.out / "target" / f"{name}.json"))
        results["runs"][name] = {"stage1": {k: v for k, v in run.items() if not k.startswith("curve_")},
                                 "target": {k: target[k]["mean"] for k in PERS_KEYS if k in target},
                                 "target_clients": target.get("clients")}
    cells = []
    for epochs in args.epochs:
        cell: dict = {"epochs": epochs}
        for aggregator in ("fedavg", "fedfish"):
            got = [results["runs"].get(f"{args.pretrain_site}-{aggregator}-E{epochs}-s{s}") for s in args.seeds]
            cell[aggregator] = {
                **{f"target_{k}": mean_std([g["target"].get(k) if g else None for g in got]) for k in PERS_KEYS},
                "stage1_eval_loss": mean_std([g["stage1"]["eval_loss"] if g else None for g in got]),
                "stage1_pers_post_accuracy": mean_std([g["stage1"].get("pers_post_accuracy") if g else None
                                                       for g in got]),
            }
        fish = [results["runs"].get(f"{args.pretrain_site}-fedfish-E{epochs}-s{s}") for s in args.seeds]
        avg = [results["runs"].get(f"{args.pretrain_site}-fedavg-E{epochs}-s{s}") for s in args.seeds]
        ok = [(f, a) for f, a in zip(fish, avg) if f and a]
        cell["fedfish_minus_fedavg"] = {
            **{f"target_{k}": paired([f["target"].get(k) for f, _ in ok], [a["target"].get(k) for _, a in ok])
               for k in PERS_KEYS},
            "stage1_eval_loss": paired([f["stage1"]["eval_loss"] for f, _ in ok], [a["stage1"]["eval_loss"] for _, a in ok]),
            "stage1_pers_post_accuracy": paired([f["stage1"].get("pers_post_accuracy") for f, _ in ok],
                                                [a["stage1"].get("pers_post_accuracy") for _, a in ok]),
        }
        cells.append(cell)
    start = {k: mean_std([results["start_model"][str(s)][k]["mean"] for s in args.seeds]) for k in PERS_KEYS
             if k in results["start_model"][str(args.seeds[0])]}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"settings": settings, "stage1_wall_seconds": stage1_seconds,
               "wall_seconds": time.perf_counter() - started, "start_model_target": start, "cells": cells,
               "runs": results["runs"]}
    if not all_finite(cells):
        print("warning: some summary values are not finite", flush=True)
    (args.out / "pretrain_personalize.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary)
    (args.out / "pretrain_personalize_table.md").write_text(table + "\n")
    plot(summary, args.out / "pretrain_personalize.png")
    print(table)
    return summary


def markdown_table(summary: dict) -> str:
    def ms(d):
        return f"{d['mean']:.4f} ± {d['std']:.4f}" if d else "–"

    def pd(d):
        return f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}]" if d else "–"

    s = summary["settings"]
    lines = [f"Target: {s['target_site']} test clients, read with the {s['pretrain_site']} vocabulary. "
             "Mean over seeds ± std; differences paired by seed, mean [min, max].", "",
             "| E | model | target pre loss | target post loss | target pre acc | target post acc | "
             "target post acc (no OOV/EOS) |", "|---|---|---|---|---|---|---|"]
    start = summary["start_model_target"]
    lines.append(f"| – | start (no federated pretraining) | {ms(start.get('pre_loss'))} | {ms(start.get('post_loss'))} | "
                 f"{ms(start.get('pre_accuracy'))} | {ms(start.get('post_accuracy'))} | "
                 f"{ms(start.get('post_accuracy_no_oov_eos'))} |")
    for c in summary["cells"]:
        for agg in ("fedavg", "fedfish"):
            a = c[agg]
            lines.append(f"| {c['epochs']} | {agg} | {ms(a['target_pre_loss'])} | {ms(a['target_post_loss'])} | "
                         f"{ms(a['target_pre_accuracy'])} | {ms(a['target_post_accuracy'])} | "
                         f"{ms(a['target_post_accuracy_no_oov_eos'])} |")
        d = c["fedfish_minus_fedavg"]
        lines.append(f"| {c['epochs']} | FedFish − FedAvg | {pd(d['target_pre_loss'])} | {pd(d['target_post_loss'])} | "
                     f"{pd(d['target_pre_accuracy'])} | {pd(d['target_post_accuracy'])} | "
                     f"{pd(d['target_post_accuracy_no_oov_eos'])} |")
    lines += ["", f"Stage 1 ({s['pretrain_site']}, held-out loss after the last round; and post-personalization "
              "accuracy on its own test clients):", "",
              "| E | FedAvg loss | FedFish loss | Fish − Avg loss | Fish − Avg own pers. post acc |", "|---|---|---|---|---|"]
    for c in summary["cells"]:
        d = c["fedfish_minus_fedavg"]
        lines.append(f"| {c['epochs']} | {ms(c['fedavg']['stage1_eval_loss'])} | {ms(c['fedfish']['stage1_eval_loss'])} | "
                     f"{pd(d['stage1_eval_loss'])} | {pd(d['stage1_pers_post_accuracy'])} |")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3), constrained_layout=True)
    s = summary["settings"]
    for axis, (key, title) in zip(axes, (("target_pre_loss", "pre loss"), ("target_post_loss", "post loss"),
                                          ("target_post_accuracy", "post accuracy"))):
        for k, (agg, color) in enumerate((("fedavg", "tab:red"), ("fedfish", "tab:green"))):
            for i, c in enumerate(summary["cells"]):
                runs = [summary["runs"].get(f"{s['pretrain_site']}-{agg}-E{c['epochs']}-s{seed}") for seed in s["seeds"]]
                values = [r["target"][key.removeprefix("target_")] for r in runs if r]
                axis.scatter([i + (k - 0.5) * 0.25] * len(values), values, color=color, s=14,
                             label=agg if i == 0 else None)
        start = summary["start_model_target"].get(key.removeprefix("target_"))
        if start:
            axis.axhline(start["mean"], color="gray", ls=":", lw=1, label="start model")
        axis.set_xticks(range(len(summary["cells"])), [f"E={c['epochs']}" for c in summary["cells"]])
        axis.set_title(f"{s['target_site']} test clients: {title}", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"federated pretraining on {s['pretrain_site']}, personalization on {s['target_site']} "
                 f"(each dot one seed)", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=65)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
