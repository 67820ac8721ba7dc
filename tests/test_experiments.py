"""Smoke tests of the experiments' quick variants: they run, and their outputs are well formed and finite.

They do not assert which aggregator wins: that is what the full experiments measure (docs/results.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _run(script: str, out: Path, *extra: str) -> None:
    done = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _finite(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite(v) for v in obj)
    return True


@pytest.mark.slow
def test_toy_regression_quick(tmp_path):
    _run("toy_regression.py", tmp_path)
    summary = json.loads((tmp_path / "toy_regression.json").read_text())
    assert (tmp_path / "toy_regression.png").stat().st_size > 0
    table = summary["table"]
    assert {(e["rounds"], e["overlap"]) for e in table} == {(1, 0.0), (1, 3.0), (2, 0.0), (2, 3.0)}
    for entry in table:
        assert entry["seeds"] == 2
        for model in ("client_A", "client_B", "fedavg", "fedfish"):
            for split in ("A", "B", "union"):
                assert entry[f"{model}/{split}"]["mean"] >= 0
    assert len(summary["runs"]) == 8
    assert _finite(summary)


@pytest.mark.slow
def test_local_epochs_quick(tmp_path):
    _run("local_epochs.py", tmp_path)
    summary = json.loads((tmp_path / "local_epochs.json").read_text())
    assert summary["runs_complete"] == summary["runs_planned"] == 12  # 2 E × 2 seeds × 3 variants
    assert (tmp_path / "local_epochs_synthetic.png").stat().st_size > 0
    assert "Fish − Avg loss" in (tmp_path / "local_epochs_table.md").read_text()
    cells = summary["cells"]
    assert [(c["epochs"], c["lr"]) for c in cells] == [(1, 0.1), (2, 0.1)]
    for cell in cells:
        for variant in ("fedavg", "fedfish", "fedavg_slr2"):
            assert cell[variant]["eval_loss"]["n"] == 2
        difference = cell["fedfish_minus_fedavg"]["eval_loss"]
        assert difference["n"] == 2 and difference["min"] <= difference["mean"] <= difference["max"]
        assert cell["fedfish_minus_fedavg"]["pers_post_accuracy"] is not None
        assert cell["fedfish_minus_fedavg"]["csb_loss_mean"] is not None
    assert _finite(cells)
    for run in summary["runs"].values():
        assert run["skipped_clients"] == 0
        assert len(run["curve_eval_loss"]) == 2 and _finite(run["curve_eval_loss"])
    # Paired seeds: FedFish and FedAvg of one seed trained the same clients in every round.
    runs = tmp_path / "runs"
    for seed in (0, 1):
        clients = [[json.loads(line)["clients"] for line in (runs / f"synthetic-{agg}-E1-lr0.1-s{seed}" /
                                                              "metrics.jsonl").read_text().splitlines()]
                   for agg in ("fedavg", "fedfish")]
        assert clients[0] == clients[1]
    # A second invocation finds every run complete and only rewrites the summary.
    _run("local_epochs.py", tmp_path)
    assert json.loads((tmp_path / "local_epochs.json").read_text())["cells"] == summary["cells"]


@pytest.mark.slow
def test_pretrain_personalize_quick(tmp_path, stackexchange_dir, monkeypatch):
    monkeypatch.setenv("FISHMERGE_STACKEXCHANGE", str(stackexchange_dir))
    _run("pretrain_personalize.py", tmp_path)
    summary = json.loads((tmp_path / "pretrain_personalize.json").read_text())
    assert (tmp_path / "pretrain_personalize.png").stat().st_size > 0
    assert set(summary["runs"]) == {"matheducators-fedavg-E1-s0", "matheducators-fedfish-E1-s0"}
    for run in summary["runs"].values():
        assert run["target_clients"] > 0
        assert {"pre_loss", "post_loss", "pre_accuracy", "post_accuracy"} <= set(run["target"])
    assert summary["start_model_target"]["pre_loss"]["n"] == 1
    assert _finite(summary["cells"]) and _finite(summary["runs"])
