"""`fishmerge plot`: held-out accuracy and Client-Server Barrier per round, for one or more runs, in one PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from fishmerge.errors import ConfigError, DataError

PANELS = (("eval_accuracy", "held-out accuracy"), ("eval_loss", "held-out loss"),
          ("csb_loss", "client-server barrier (loss)"), ("csb_accuracy", "client-server barrier (accuracy)"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: give the --output-dir of a `fishmerge federate` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """Draw every run's curves into ``out`` (PNG); the legend uses ``labels`` or the folder names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'fishmerge[plot]'") from None
    labels = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ConfigError(f"got {len(run_dirs)} runs but {len(labels)} labels: give one label per run")
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for run_dir, label in zip(run_dirs, labels):
        rows = read_metrics(run_dir)
        for axis, (key, title) in zip(axes.flat, PANELS):
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=label)
            axis.set_title(title)
            axis.set_xlabel("round")
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
    axes.flat[0].legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
