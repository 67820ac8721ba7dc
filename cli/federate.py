"""`fishmerge federate`: FedFish or FedAvg over per-user clients, under Accelerate."""

from __future__ import annotations

import argparse
from pathlib import Path

from fishmerge.cli.push import add_push_arguments, check_push_args, push_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "federate",
        help="federated FedFish / FedAvg training (run under `accelerate launch` for several processes)",
        description="Federated training with FedFish (Fisher-weighted aggregation) or FedAvg. Without --config it "
        "runs the embedded default: synthetic Stack-Overflow-like users and a small Llama pretrained on general "
        "text, all offline. Flags override the config file.",
    )
    parser.add_argument("--config", type=Path, default=None, help="run config (YAML)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--local-epochs", type=int, default=None)
    parser.add_argument("--aggregator", choices=["fedfish", "fedavg"], default=None)
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir after its last round")
    add_push_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fishmerge.federated.config import load_run_config
    from fishmerge.federated.driver import run_federated

    check_push_args(args)
    config = load_run_config(args.config, rounds=args.rounds, clients_per_round=args.clients_per_round,
                             local_epochs=args.local_epochs, aggregator=args.aggregator, output_dir=args.output_dir,
                             seed=args.seed)
    final = run_federated(config, resume=args.resume, repo_id=args.push_to_hub)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(final)
        push_from_args(final, args)
    return 0
