"""`fishmerge merge RECIPE.yaml --out OUT_DIR`, or the same recipe from flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from fishmerge.cli.push import add_push_arguments, check_push_args, push_from_args
from fishmerge.methods import METHODS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="merge checkpoints (Fisher-weighted or plain average), streaming tensor by tensor",
        description="Merge transformers checkpoints or PEFT adapters of one architecture. Give a YAML recipe, or "
        "--model (with --fisher, --weight) once per input.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods:\n" + "\n".join(f"  {m.name}: {m.summary}" for m in METHODS.values()),
    )
    parser.add_argument("recipe", nargs="?", type=Path, help="YAML recipe (method, models, damping, ...)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not be or lie in an input)")
    parser.add_argument("--model", action="append", type=Path, default=[], help="an input checkpoint (repeat)")
    parser.add_argument("--fisher", action="append", type=Path, default=[], help="its Fisher folder (repeat, in order)")
    parser.add_argument("--weight", action="append", type=float, default=[], help="its weight λ (repeat, in order)")
    parser.add_argument("--method", choices=list(METHODS), default=None, help="merge method (default: fisher)")
    parser.add_argument("--damping", type=float, default=None, help="δ added to every Fisher (default 1e-8)")
    parser.add_argument("--normalize", action="store_true", default=None, help="scale each Fisher to unit L2 norm")
    parser.add_argument("--uniform", action="store_true", help="λ_i = 1 instead of the Fishers' n_examples")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="output dtype")
    parser.add_argument("--max-shard-size", default=None, help="largest output shard, e.g. 5GB (default)")
    parser.add_argument("--base", type=Path, default=None, help="copy config and tokenizer from here (default: 1st model)")
    parser.add_argument("--allow-pickle", action="store_true", default=None, help="read pickled .bin weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    add_push_arguments(parser)
    parser.set_defaults(func=run)


def recipe_from_args(args: argparse.Namespace):
    """The validated recipe: the YAML file, or one assembled from flags."""
    from fishmerge.config import MergeRecipe, parse_config
    from fishmerge.errors import ConfigError
    from fishmerge.merge import load_recipe

    overrides = {
        "method": args.method,
        "damping": args.damping,
        "normalize": args.normalize,
        "weights": "uniform" if args.uniform else None,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "base": args.base,
        "allow_pickle": args.allow_pickle,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.recipe is not None:
        if args.model or args.fisher or args.weight:
            raise ConfigError("give either a recipe file or --model flags, not both")
        recipe = load_recipe(args.recipe)
        return parse_config(MergeRecipe, {**recipe.model_dump(exclude_none=True), **overrides}, str(args.recipe))
    if not args.model:
        raise ConfigError("nothing to merge: give a recipe file or at least one --model")
    for flag, values in (("--fisher", args.fisher), ("--weight", args.weight)):
        if values and len(values) != len(args.model):
            raise ConfigError(f"got {len(args.model)} --model but {len(values)} {flag}: give one {flag} per --model")
    models = []
    for i, model in enumerate(args.model):
        entry = {"model": model}
        if args.fisher:
            entry["fisher"] = args.fisher[i]
        if args.weight:
            entry["weight"] = args.weight[i]
        models.append(entry)
    return parse_config(MergeRecipe, {"models": models, **overrides}, "command line")


def run(args: argparse.Namespace) -> int:
    from fishmerge.merge import execute_merge, plan_merge

    check_push_args(args)
    plan = plan_merge(recipe_from_args(args))
    if args.dry_run:
        print(plan.recipe.to_yaml(), end="")
        print(f"# {len(plan.tasks)} tensors, weights {plan.weights}, output {args.out}")
        return 0
    out = execute_merge(plan, args.out, overwrite=args.overwrite, repo_id=args.push_to_hub)
    print(out)
    push_from_args(out, args)
    return 0
