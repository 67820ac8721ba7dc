"""The top-level API is importable without loading torch, and names the operators."""

import subprocess
import sys

import fishmerge


def test_top_level_names_resolve_to_the_operators():
    from fishmerge.estimate import estimate_fisher
    from fishmerge.kernels import fisher_merge
    from fishmerge.merge import execute_merge, plan_merge

    assert fishmerge.estimate_fisher is estimate_fisher
    assert fishmerge.fisher_merge is fisher_merge
    assert (fishmerge.plan_merge, fishmerge.execute_merge) == (plan_merge, execute_merge)
    assert set(fishmerge.__all__) >= {"estimate_fisher", "plan_merge", "fisher_merge", "run_federated"}


def test_import_is_light_and_help_lists_every_command():
    code = "import sys, fishmerge; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "fishmerge", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("estimate", "merge", "push", "federate", "personalize", "pretrain", "plot", "demo"):
        assert command in out
    merge_help = subprocess.run([sys.executable, "-m", "fishmerge", "merge", "--help"], capture_output=True, text=True,
                                check=True).stdout
    assert "fisher: Fisher-weighted average" in merge_help and "average:" in merge_help  # from the registry
