"""Bad input: a one-line error naming problem and fix, a non-zero exit, and no output folder left behind."""

import shutil

import pytest
import torch
import yaml

from builders import fails_with_one_line, save_model, save_random_fisher
from fishmerge.cli.main import main
from fishmerge.writer import save_tensors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    a = save_model(root / "a", seed=1)
    b = save_model(root / "b", seed=2)
    fa = save_random_fisher(root / "fa", a, seed=3)
    fb = save_random_fisher(root / "fb", a, seed=4)
    return root, a, b, fa, fb


def _merge_argv(out, *pairs, extra=()):
    argv = ["merge", "--out", out]
    for model, fisher in pairs:
        argv += ["--model", model] + (["--fisher", fisher] if fisher else [])
    return argv + list(extra)


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_path(inputs, tmp_path, capsys):
    _, a, _, fa, fb = inputs
    out = tmp_path / "out"
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (tmp_path / "nope", fb)), "does not exist", "nope")
    _assert_nothing_written(out)


def test_folder_that_is_not_a_checkpoint(inputs, tmp_path, capsys):
    _, a, _, fa, fb = inputs
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (tmp_path / "empty", fb)), "not a checkpoint", "save_pretrained")
    _assert_nothing_written(out)


def test_every_name_and_shape_mismatch_is_listed(inputs, tmp_path, capsys):
    _, a, _, fa, fb = inputs
    other = save_model(tmp_path / "wide", seed=5, intermediate_size=48)
    out = tmp_path / "out"
    line = fails_with_one_line(capsys, _merge_argv(out, (a, None), (other, None), extra=["--method", "average"]),
                  "do not have the same parameters", "mlp.up_proj.weight", "[32, 16]", "[48, 16]")
    assert line.count("mlp.") == 6  # up, gate, down of both layers: all listed in one message
    _assert_nothing_written(out)


def test_missing_fisher_for_a_model(inputs, tmp_path, capsys):
    _, a, b, fa, _ = inputs
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [{"model": str(a), "fisher": str(fa)}, {"model": str(b)}]}))
    fails_with_one_line(capsys, ["merge", recipe, "--out", out], "no Fisher given", str(b))
    fails_with_one_line(capsys, _merge_argv(out, (a, None), (b, None)), "needs a Fisher", "fishmerge estimate")
    _assert_nothing_written(out)


def test_fisher_with_other_names_or_shapes(inputs, tmp_path, capsys):
    _, a, b, fa, _ = inputs
    bad = save_random_fisher(tmp_path / "fbad", a, seed=9, skip=("model.norm.weight",))
    out = tmp_path / "out"
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (b, bad)), "Fishers do not match", "model.norm.weight")
    wrong = tmp_path / "fwrong"
    shutil.copytree(fa, wrong)
    from fishmerge.checkpoint import open_fisher
    from fishmerge.tensorstore import TensorStore

    store = TensorStore(fa, "fisher")
    tensors = {n: store.read(n) for n in store.names()}
    tensors["model.norm.weight"] = torch.ones(3)
    save_tensors(wrong, "fisher", tensors, metadata=open_fisher(fa).metadata)
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (b, wrong)), "model.norm.weight is [3]")
    _assert_nothing_written(out)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_fisher_with_nan_inf_or_negative_values(inputs, tmp_path, capsys, value):
    _, a, b, fa, _ = inputs
    from fishmerge.checkpoint import open_fisher
    from fishmerge.tensorstore import TensorStore

    store = TensorStore(fa, "fisher")
    tensors = {n: store.read(n) for n in store.names()}
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = value  # late in the file: output is half-written
    save_tensors(tmp_path / "fbad", "fisher", tensors, metadata=open_fisher(fa).metadata)
    out = tmp_path / "out"
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (b, tmp_path / "fbad")), "re-estimate", "down_proj")
    _assert_nothing_written(out)


def test_corrupt_or_truncated_safetensors(inputs, tmp_path, capsys):
    _, a, b, fa, fb = inputs
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (broken, fb)), "truncated", "model.safetensors")
    _assert_nothing_written(out)


def test_pickle_weights_are_refused_unless_opted_in(inputs, tmp_path, capsys):
    _, a, b, fa, fb = inputs
    pickled = tmp_path / "pickled"
    shutil.copytree(b, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "out"
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (pickled, fb)), "pickled weights", "--allow-pickle")
    _assert_nothing_written(out)
    assert main([str(x) for x in _merge_argv(out, (a, fa), (pickled, fb), extra=["--allow-pickle"])]) == 0
    assert (out / "model.safetensors").exists()


def test_output_equal_to_or_inside_an_input(inputs, capsys):
    _, a, b, fa, fb = inputs
    before = sorted(p.name for p in a.iterdir())
    for out in (a, a / "merged", fa / "merged"):
        fails_with_one_line(capsys, _merge_argv(out, (a, fa), (b, fb)), "inside input")
    assert sorted(p.name for p in a.iterdir()) == before


def test_existing_output_needs_overwrite(inputs, tmp_path, capsys):
    _, a, b, fa, fb = inputs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails_with_one_line(capsys, _merge_argv(out, (a, fa), (b, fb)), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_recipe_keys_are_named_with_their_path(inputs, tmp_path, capsys):
    _, a, b, fa, fb = inputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "fisher", "dampening": 1.0,
                                      "models": [{"model": str(a), "fishr": str(fa)}, {"model": str(b)}]}))
    out = tmp_path / "out"
    fails_with_one_line(capsys, ["merge", recipe, "--out", out], "models.0.fishr: unknown key", "dampening: unknown key")
    _assert_nothing_written(out)


def test_unknown_method(inputs, tmp_path, capsys):
    _, a, b, fa, fb = inputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "models": [{"model": str(a)}]}))
    fails_with_one_line(capsys, ["merge", recipe, "--out", tmp_path / "out"], "unknown merge method 'ties'", "average, fisher")
