"""`fishmerge estimate MODEL_DIR DATA --out FISHER_DIR`: diagonal Fisher of a checkpoint on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from fishmerge.fisher.accumulate import ESTIMATORS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate",
        help="estimate the diagonal Fisher of a checkpoint on a dataset",
        description="Estimate the diagonal Fisher information of a transformers causal LM or a PEFT adapter on a "
        "dataset, and save it as fp32 safetensors keyed by parameter name. Run it under `accelerate launch` to "
        "split the data over processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="estimators:\n" + "\n".join(f"  {name}: {text}" for name, text in ESTIMATORS.items()),
    )
    parser.add_argument("model_dir", type=Path, help="checkpoint folder (transformers model or PEFT adapter)")
    parser.add_argument("data", type=Path, help=".jsonl/.json/.csv/.parquet/.txt file or a save_to_disk folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the Fisher into")
    parser.add_argument("--estimator", choices=list(ESTIMATORS), default="empirical")
    parser.add_argument("--max-examples", type=int, default=None, help="use at most N examples")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="truncate examples to L tokens")
    parser.add_argument("--text-column", default=None, help="column holding the text (default: text)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled estimator's draws")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="examples whose per-example gradients are formed at once (default: as many as keep "
                        "the largest parameter's under 1 GiB; lower it to save memory)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run custom model code from the checkpoint")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickled .bin weights (trusted files only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fishmerge.errors import ConfigError
    from fishmerge.estimate import EstimateOptions, estimate_fisher

    for flag in ("max_examples", "batch_size", "max_length", "chunk_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    options = EstimateOptions(
        estimator=args.estimator,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        max_length=args.max_length,
        text_column=args.text_column,
        device=args.device,
        seed=args.seed,
        chunk_size=args.chunk_size,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    estimate_fisher(args.model_dir, args.data, args.out, options)
    return 0
