"""`fishmerge demo`: fine-tune two copies of a small model, estimate Fishers, merge, and compare (offline)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole merge workflow on an embedded default (no downloads)",
        description="Pretrain a small Llama on synthetic general text, fine-tune two copies on two topics, "
        "estimate each one's Fisher, merge them with `fisher` and `average`, and print each model's loss and "
        "next-token accuracy on both topics.",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("fishmerge-demo"), help="where models are written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller run, for smoke tests")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fishmerge.demo import format_table, run_demo

    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = run_demo(args.output_dir, seed=args.seed, quick=args.quick)
    print(format_table(rows))
    return 0
