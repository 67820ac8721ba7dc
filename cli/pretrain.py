"""`fishmerge pretrain --out DIR`: the small model a federated run starts from, pretrained centrally."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="build and centrally pretrain the small Llama of a run config on general text",
        description="Build the fresh small model of the run config (model.new), pretrain it on the synthetic "
        "generator's general text with the data's word-level tokenizer, and save it with the tokenizer. "
        "`fishmerge federate` does the same on first use and caches the result.",
    )
    parser.add_argument("--config", type=Path, default=None, help="run config (YAML); default: the embedded one")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fishmerge.errors import ConfigError
    from fishmerge.federated.config import load_run_config
    from fishmerge.federated.data import load_federated_data
    from fishmerge.federated.models import build_pretrained, default_cache_dir
    from fishmerge.writer import check_output_path

    config = load_run_config(args.config)
    if config.model.new is None:
        raise ConfigError("pretrain builds model.new; this config points at a checkpoint (model.path) instead")
    check_output_path(args.out, [], overwrite=args.overwrite)
    data = load_federated_data(config.data, Path(config.cache_dir or default_cache_dir()))
    print(build_pretrained(config, data.tokenizer, args.out))
    return 0
