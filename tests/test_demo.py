"""The quick start's demo, in its quick form: every stage runs and the table is sound."""

import math

import pytest

from fishmerge.demo import format_table, run_demo


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    rows = run_demo(tmp_path, quick=True)
    labels = [label for label, _, _ in rows]
    assert labels[-2:] == ["merge: fisher", "merge: average"] and len(rows) == 5
    for _, a, b in rows:
        assert math.isfinite(a.loss) and math.isfinite(b.loss) and 0 <= a.accuracy <= 1
    for name in ("merged_fisher", "merged_average"):
        assert (tmp_path / name / "model.safetensors").exists() and (tmp_path / name / "README.md").exists()
    fisher, average = rows[-2], rows[-1]
    # The demo's point, on its fixed seed: Fisher merging keeps more of both topics than the plain average.
    assert fisher[1].loss + fisher[2].loss < average[1].loss + average[2].loss
    assert "merge: fisher" in format_table(rows)
