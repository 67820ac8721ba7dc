"""Copy the experiments' summaries and figures into the repository, small: ``experiments/results/``, ``docs/figures/``.

Run after the experiments, with their ``--out`` folders:

    python experiments/export_results.py --toy TOY_OUT --local-epochs LE_OUT --pretrain-personalize PP_OUT

Floats are rounded to 5 significant digits and per-round curves are dropped from the JSON; the federated runs
themselves (checkpoints) stay in the ``--out`` folders.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
FIGURES = ROOT / "docs" / "figures"


def rounded(obj):
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items() if not k.startswith("curve_")}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def write_json(data, path: Path) -> None:
    path.write_text(json.dumps(rounded(data), separators=(",", ":")) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", type=Path)
    parser.add_argument("--local-epochs", type=Path)
    parser.add_argument("--pretrain-personalize", type=Path)
    parser.add_argument("--curves", type=Path, help="a PNG written by `fishmerge plot`")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    FIGURES.mkdir(parents=True, exist_ok=True)
    if args.toy:
        write_json(json.loads((args.toy / "toy_regression.json").read_text()), RESULTS / "toy_regression.json")
        shutil.copy(args.toy / "toy_regression.png", FIGURES / "toy_regression.png")
    if args.local_epochs:
        out = args.local_epochs
        summary = json.loads((out / "local_epochs.json").read_text())
        # The sweep's own wall time depends on how many runs were already complete (it resumes); the runs' sum is kept.
        write_json({k: v for k, v in summary.items() if k not in ("runs", "sweep_wall_seconds")},
                   RESULTS / "local_epochs.json")
        write_json(summary["runs"], RESULTS / "local_epochs_runs.json")
        shutil.copy(out / "local_epochs_table.md", RESULTS / "local_epochs_table.md")
        for extra in ("update_norms.json", "update_norms.md"):
            if (out / extra).is_file():
                shutil.copy(out / extra, RESULTS / extra)
        for figure in out.glob("local_epochs_*.png"):
            shutil.copy(figure, FIGURES / figure.name)
    if args.pretrain_personalize:
        out = args.pretrain_personalize
        write_json(json.loads((out / "pretrain_personalize.json").read_text()), RESULTS / "pretrain_personalize.json")
        shutil.copy(out / "pretrain_personalize_table.md", RESULTS / "pretrain_personalize_table.md")
        shutil.copy(out / "pretrain_personalize.png", FIGURES / "pretrain_personalize.png")
    if args.curves:
        shutil.copy(args.curves, FIGURES / "curves_synthetic.png")
    for path in sorted([*RESULTS.iterdir(), *FIGURES.iterdir()]):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
