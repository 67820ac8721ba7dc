"""`fishmerge merge` end to end on tiny checkpoints in tmp_path, against the in-memory kernel."""

import shutil

import pytest
import torch
import yaml

from builders import load_state, save_adapter, save_model, save_random_fisher
from fishmerge import kernels
from fishmerge.merge import execute_merge, merge, plan_merge
from fishmerge.tensorstore import TensorStore
from fishmerge.workspace import Workspace


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    a = save_model(root / "a", seed=1)
    b = save_model(root / "b", seed=2, shard="8KB")  # sharded input
    fa = save_random_fisher(root / "fa", a, seed=3, n_examples=10)
    fb = save_random_fisher(root / "fb", a, seed=4, n_examples=30)
    return a, b, fa, fb


def _recipe(a, b, fa, fb, **extra):
    return {"method": "fisher", "models": [{"model": a, "fisher": fa}, {"model": b, "fisher": fb}], **extra}


def test_fisher_merge_matches_the_in_memory_kernel_and_loads(two_models, tmp_path):
    a, b, fa, fb = two_models
    plan = plan_merge(_recipe(a, b, fa, fb, damping=1e-3, max_shard_size="4KB"))
    out = execute_merge(plan, tmp_path / "merged", block_bytes=256)  # many row blocks per tensor
    assert (out / "model.safetensors.index.json").exists()
    merged = load_state(out)
    sa, sb, fsa, fsb = load_state(a), load_state(b), load_state(fa, "fisher"), load_state(fb, "fisher")
    assert set(merged) == set(sa)
    for name in sa:
        expected = kernels.fisher_merge([sa[name], sb[name]], [fsa[name], fsb[name]], [10.0, 30.0], 1e-3)
        torch.testing.assert_close(merged[name], expected.to(sa[name].dtype), rtol=0, atol=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert AutoTokenizer.from_pretrained(out).pad_token_id == 0  # tokenizer copied from the first input
    assert (out / "config.json").exists() and (out / "generation_config.json").exists()


def test_inputs_saved_in_different_dtypes_are_merged_at_the_wider_one(two_models, tmp_path):
    from safetensors.torch import save_file

    a, b, fa, fb = two_models
    half = tmp_path / "a-bf16"
    shutil.copytree(a, half)
    save_file({k: v.bfloat16() for k, v in load_state(a).items()}, half / "model.safetensors", {"format": "pt"})
    merged = load_state(merge(_recipe(half, b, fa, fb, damping=1e-3), tmp_path / "merged"))
    sh, sb, fsa, fsb = load_state(half), load_state(b), load_state(fa, "fisher"), load_state(fb, "fisher")
    for name, value in sh.items():
        # b's fp32 values enter the arithmetic unrounded; the output takes the first input's dtype.
        expected = kernels.fisher_merge([value, sb[name]], [fsa[name], fsb[name]], [10.0, 30.0], 1e-3)
        torch.testing.assert_close(merged[name], expected.to(value.dtype), rtol=0, atol=0)


def test_model_card_names_method_inputs_weights_and_fishers(two_models, tmp_path):
    a, b, fa, fb = two_models
    out = merge(_recipe(a, b, fa, fb), tmp_path / "merged")
    card = (out / "README.md").read_text()
    for needle in ("fisher", str(a), str(b), str(fa), "empirical", "fisher-merging", "2111.09832"):
        assert needle in card


def test_average_uses_fisher_example_counts_as_weights(two_models, tmp_path):
    a, b, fa, fb = two_models
    out = merge(_recipe(a, b, fa, fb, method="average", dtype="float32"), tmp_path / "avg")
    merged, sa, sb = load_state(out), load_state(a), load_state(b)
    for name in sa:
        torch.testing.assert_close(merged[name], 0.25 * sa[name] + 0.75 * sb[name])


def test_explicit_weights_and_uniform(two_models, tmp_path):
    a, b, fa, fb = two_models
    recipe = {"method": "average", "weights": "uniform", "models": [{"model": a}, {"model": b, "weight": 3.0}]}
    merged, sa, sb = load_state(merge(recipe, tmp_path / "w")), load_state(a), load_state(b)
    name = "model.norm.weight"
    torch.testing.assert_close(merged[name], 0.25 * sa[name] + 0.75 * sb[name])


def test_one_model_gives_itself(two_models, tmp_path):
    a, _, fa, _ = two_models
    out = merge({"models": [{"model": a, "fisher": fa}]}, tmp_path / "self")
    merged, sa = load_state(out), load_state(a)
    for name in sa:
        torch.testing.assert_close(merged[name], sa[name])


def test_tensors_without_fisher_are_averaged(two_models, tmp_path):
    a, b, _, _ = two_models
    fa = save_random_fisher(tmp_path / "fa", a, seed=5, skip=("model.norm.weight",))
    fb = save_random_fisher(tmp_path / "fb", a, seed=6, skip=("model.norm.weight",))
    merged, sa, sb = load_state(merge(_recipe(a, b, fa, fb), tmp_path / "m")), load_state(a), load_state(b)
    torch.testing.assert_close(merged["model.norm.weight"], 0.5 * sa["model.norm.weight"] + 0.5 * sb["model.norm.weight"])


def test_normalize_scales_each_fisher_to_unit_norm(two_models, tmp_path):
    a, b, fa, fb = two_models
    out = merge(_recipe(a, b, fa, fb, normalize=True, damping=0.0, dtype="float32"), tmp_path / "n")
    fsa, fsb = load_state(fa, "fisher"), load_state(fb, "fisher")
    na = sum(t.double().square().sum() for t in fsa.values()).sqrt().item()
    nb = sum(t.double().square().sum() for t in fsb.values()).sqrt().item()
    sa, sb, merged = load_state(a), load_state(b), load_state(out)
    name = "model.layers.0.mlp.up_proj.weight"
    expected = kernels.fisher_merge([sa[name], sb[name]], [fsa[name] / na, fsb[name] / nb], [10.0, 30.0], 0.0)
    torch.testing.assert_close(merged[name], expected)


def test_merge_streams_every_tensor_once_through_bounded_buffers(two_models, tmp_path, monkeypatch):
    a, b, fa, fb = two_models
    order: list[str] = []
    blocks = []
    read = TensorStore.read

    def recording_read(self, name, rows=None, out=None):
        if not order or order[-1] != name:
            order.append(name)
        blocks.append(rows)
        return read(self, name, rows, out)

    largest = [0]
    take = Workspace.tensor

    def recording_take(self, key, shape, dtype=torch.float32, device="cpu"):
        tensor = take(self, key, shape, dtype, device)
        largest[0] = max(largest[0], tensor.nbytes)
        return tensor

    monkeypatch.setattr(TensorStore, "read", recording_read)
    monkeypatch.setattr(Workspace, "tensor", recording_take)
    block_bytes = 1024
    execute_merge(plan_merge(_recipe(a, b, fa, fb)), tmp_path / "streamed", block_bytes=block_bytes)
    state = load_state(a)
    assert len(order) == len(set(order)) == len(state)  # each name visited once, never revisited
    assert len(blocks) > 4 * len(state)  # the large tensors really went through in several blocks
    widest_row = max(t[0].nbytes for t in state.values() if t.dim() > 1)
    # Two inputs stacked: no buffer ever holds more than two blocks (or two rows, when a row is larger).
    assert largest[0] <= 2 * max(block_bytes, widest_row)
    torch.testing.assert_close(load_state(tmp_path / "streamed"), load_state(merge(_recipe(a, b, fa, fb),
                                                                                      tmp_path / "whole")))


def test_peft_adapters_merge_and_load(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "base", seed=0)
    a1 = save_adapter(tmp_path / "lora1", base, seed=1)
    a2 = save_adapter(tmp_path / "lora2", base, seed=2)
    f1 = save_random_fisher(tmp_path / "f1", a1, seed=3, stem="adapter_model")
    f2 = save_random_fisher(tmp_path / "f2", a2, seed=4, stem="adapter_model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "fisher", "models": [
        {"model": str(a1), "fisher": str(f1)}, {"model": str(a2), "fisher": str(f2)}]}))
    out = merge(recipe, tmp_path / "merged", overwrite=False)
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    merged, s1, s2 = load_state(out, "adapter_model"), load_state(a1, "adapter_model"), load_state(a2, "adapter_model")
    g1, g2 = load_state(f1, "fisher"), load_state(f2, "fisher")
    for name in s1:
        torch.testing.assert_close(merged[name], kernels.fisher_merge([s1[name], s2[name]], [g1[name], g2[name]],
                                                                      [10.0, 10.0], 1e-8))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert "library_name: peft" in (out / "README.md").read_text()
