"""The per-example squared-gradient engine against its oracles: the batch-1 loop and closed forms."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import Tensor, nn

from fishmerge.errors import FishmergeError
from fishmerge.fisher import causal_lm_nll, squared_gradient_sums, squared_gradient_sums_loop

VOCAB = 64


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def padded_batch(lengths: list[int], width: int = 10, vocab: int = VOCAB, seed: int = 0) -> dict[str, Tensor]:
    """Right-padded rows of the given lengths, pad id 0, labels -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    attention_mask = (torch.arange(width) < torch.tensor(lengths).unsqueeze(1)).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
    }


def assert_sums_close(fast: dict[str, Tensor], ref: dict[str, Tensor], rtol: float = 1e-5) -> None:
    assert fast.keys() == ref.keys()
    for name in ref:
        assert fast[name].dtype == torch.float32, name
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(fast[name], ref[name], rtol=rtol, atol=rtol * scale + 1e-30, msg=name)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class ToyNLL:
    """A hand-written ``nll`` closure exposing per-example losses, as the fallback loop needs."""

    def __init__(self, per_example, x: Tensor, y: Tensor) -> None:
        self.per_example, self.x, self.y = per_example, x, y
        self.example_nlls: Tensor | None = None

    def __call__(self) -> Tensor:
        self.example_nlls = self.per_example(self.x, self.y)
        return self.example_nlls.sum()

    def split(self) -> list[ToyNLL]:
        return [ToyNLL(self.per_example, self.x[k : k + 1], self.y[k : k + 1]) for k in range(len(self.x))]


def lora_llama(target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=list(target_modules), lora_dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            nn.init.normal_(p, std=0.1)  # B = 0 at init would make every A gradient vanish
    return model.eval()


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


# --------------------------------------------------------------------------------------------------------------
# 1. Fast path == batch-1 loop
# --------------------------------------------------------------------------------------------------------------

MODELS = {
    "llama": lambda: tiny_llama(),
    "llama_tied": lambda: tiny_llama(tie_word_embeddings=True),
    "llama_lora": lora_llama,
    "gpt2_conv1d_tied": tiny_gpt2,
}


@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "sampled"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fast_path_matches_loop(kind: str, sampled: bool, caplog: pytest.LogCaptureFixture) -> None:
    model = MODELS[kind]()
    params = trainable(model)
    batch = padded_batch([10, 7, 4, 9])
    nll = causal_lm_nll(model, batch, sampled=sampled, generator=torch.Generator().manual_seed(3))

    with caplog.at_level(logging.WARNING, logger="fishmerge.fisher.persample"):
        fast = squared_gradient_sums(model, params, nll)
    # Every parameter went through a per-layer rule, none through the loop.
    assert not [r for r in caplog.records if r.name == "fishmerge.fisher.persample"]
    # split() cuts each row to its own length and reuses the targets drawn during the fast pass.
    ref = squared_gradient_sums_loop(model, params, nll.split())

    assert_sums_close(fast, ref)
    assert nll.n_tokens == (9 + 6 + 3 + 8)
    assert any(v.abs().sum() > 0 for v in fast.values())


def test_sampled_targets_are_drawn_once_on_target_positions() -> None:
    model = tiny_llama()
    batch = padded_batch([10, 5])
    nll = causal_lm_nll(model, batch, sampled=True, generator=torch.Generator().manual_seed(0))
    drawn = nll.labels
    nll()
    assert torch.equal(nll.labels, drawn)
    # Same target positions as the observed labels; position 0 is never a target after the shift.
    assert torch.equal(drawn[:, 1:] == -100, batch["labels"][:, 1:] == -100)
    assert (drawn[:, 0] == -100).all()
    assert not torch.equal(drawn, batch["labels"])


def test_tied_weight_squares_the_sum_of_its_uses() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    nll = causal_lm_nll(model, padded_batch([10, 6, 8]))
    fast = squared_gradient_sums(model, params, nll)
    ref = squared_gradient_sums_loop(model, params, nll.split())
    assert_sums_close(fast, ref)


def test_module_called_twice_and_an_unused_call() -> None:
    torch.manual_seed(0)
    lin, head = nn.Linear(6, 6), nn.Linear(6, 3)
    model = nn.ModuleDict({"lin": lin, "head": head}).eval()

    def per_example(x: Tensor, y: Tensor) -> Tensor:
        lin(x)  # off the loss path: its gradient never arrives
        logits = head(torch.tanh(lin(torch.tanh(lin(x)))))
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5, 4))
    nll = ToyNLL(per_example, x, y)
    params = dict(model.named_parameters())
    assert_sums_close(squared_gradient_sums(model, params, nll), squared_gradient_sums_loop(model, params, nll.split()))


def test_embedding_padding_idx_and_frequency_scaling() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(12, 5, padding_idx=0, scale_grad_by_freq=True)
    head = nn.Linear(5, 12)
    model = nn.ModuleDict({"emb": emb, "head": head}).eval()

    def per_example(x: Tensor, y: Tensor) -> Tensor:
        logits = head(torch.tanh(emb(x)).cumsum(1))
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    x = torch.tensor([[3, 3, 3, 0, 5], [0, 7, 7, 2, 2], [4, 4, 4, 4, 4]])  # repeated ids and padding rows
    y = torch.randint(0, 12, x.shape, generator=torch.Generator().manual_seed(1))
    nll = ToyNLL(per_example, x, y)
    params = dict(model.named_parameters())
    fast = squared_gradient_sums(model, params, nll)
    assert_sums_close(fast, squared_gradient_sums_loop(model, params, nll.split()))
    assert fast["emb.weight"][0].abs().sum() == 0


# --------------------------------------------------------------------------------------------------------------
# Fallback: parameters the per-layer rules cannot cover
# --------------------------------------------------------------------------------------------------------------


def test_lora_embedding_falls_back_to_loop_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = lora_llama(target_modules=("q_proj", "v_proj", "embed_tokens"))
    params = trainable(model)
    assert any("lora_embedding_A" in name for name in params)
    nll = causal_lm_nll(model, padded_batch([10, 6, 3]))
    with caplog.at_level(logging.WARNING, logger="fishmerge.fisher.persample"):
        fast = squared_gradient_sums(model, params, nll)
    assert "per-example backward loop" in caplog.text
    assert_sums_close(fast, squared_gradient_sums_loop(model, params, nll.split()))


class ScaledLinear(nn.Module):
    """A parameter owned directly by a module that also has children, and a leaf called with a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.inner(x) * self.gain)


def test_non_leaf_owner_and_keyword_call_fall_back() -> None:
    torch.manual_seed(0)
    body, head = ScaledLinear(), nn.Linear(4, 3)
    model = nn.ModuleDict({"body": body, "head": head}).eval()

    def per_example(x: Tensor, y: Tensor) -> Tensor:
        h = body(x)
        logits = head(input=h)  # a keyword call: no per-layer rule accepts it, the pass restarts with it looped
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    x, y = torch.randn(4, 3, 4), torch.randint(0, 3, (4, 3))
    nll = ToyNLL(per_example, x, y)
    params = dict(model.named_parameters())
    assert_sums_close(squared_gradient_sums(model, params, nll), squared_gradient_sums_loop(model, params, nll.split()))


def test_input_modified_in_place_after_use_is_refused() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 3)
    model = nn.ModuleDict({"first": first, "second": second}).eval()

    def per_example(x: Tensor, y: Tensor) -> Tensor:
        h = first(x)
        logits = second(h)
        # `second` keeps h for its per-example rule; autograd does not (its weight is frozen during the pass),
        # so only the version counter notices that the rule would read changed values.
        logits = logits + h.mul_(2.0)[..., :3]
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    x, y = torch.randn(4, 3, 4), torch.randint(0, 3, (4, 3))
    with pytest.raises(FishmergeError, match="in place"):
        squared_gradient_sums(model, dict(model.named_parameters()), ToyNLL(per_example, x, y))
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_fallback_without_example_nlls_is_a_clear_error() -> None:
    body, head = ScaledLinear(), nn.Linear(4, 3)
    model = nn.ModuleDict({"body": body, "head": head}).eval()
    x = torch.randn(2, 3, 4)
    with pytest.raises(FishmergeError, match="example_nlls"):
        squared_gradient_sums(model, dict(model.named_parameters()), lambda: head(body(x)).sum())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_activation_checkpointing_is_refused() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    lin, head = nn.Linear(4, 4), nn.Linear(4, 3)
    model = nn.ModuleDict({"lin": lin, "head": head}).eval()

    def per_example(x: Tensor, y: Tensor) -> Tensor:
        logits = head(checkpoint(lambda h: torch.tanh(lin(h)), x, use_reentrant=False))
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    nll = ToyNLL(per_example, torch.randn(3, 2, 4), torch.randint(0, 3, (3, 2)))
    with pytest.raises(FishmergeError, match="checkpointing"):
        squared_gradient_sums(model, dict(model.named_parameters()), nll)


# --------------------------------------------------------------------------------------------------------------
# 2. The batch estimator
# --------------------------------------------------------------------------------------------------------------


def per_example_gradients(model: nn.Module, params: dict[str, nn.Parameter], closures) -> list[dict[str, Tensor]]:
    return [dict(zip(params, torch.autograd.grad(nll(), list(params.values())))) for nll in closures]


def test_batch_estimator_is_square_of_summed_gradient() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    params = dict(model.named_parameters())
    nll = causal_lm_nll(model, padded_batch([10, 7, 5]))
    batch = squared_gradient_sums(model, params, nll, per_example=False)
    grads = per_example_gradients(model, params, nll.split())
    expected = {name: sum(g[name] for g in grads).square() for name in params}
    assert_sums_close(batch, expected)


def test_batch_estimator_equals_per_example_for_one_example() -> None:
    model = lora_llama()
    params = trainable(model)
    nll = causal_lm_nll(model, padded_batch([9]))
    assert_sums_close(
        squared_gradient_sums(model, params, nll, per_example=False), squared_gradient_sums(model, params, nll)
    )


# --------------------------------------------------------------------------------------------------------------
# 3. Closed forms: softmax regression
# --------------------------------------------------------------------------------------------------------------


def softmax_regression(d: int = 5, classes: int = 4, n: int = 8) -> tuple[nn.Linear, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(d, classes).eval()
    with torch.no_grad():
        model.weight.mul_(3.0)  # peaked but not degenerate probabilities
    return model, torch.randn(n, d), torch.randint(0, classes, (n,))


def outer_squares(residual: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_k ((r_k ⊗ x_k)², r_k²): the squared per-example gradients of softmax regression."""
    return torch.einsum("kc,kd->cd", residual.square(), x.square()), residual.square().sum(0)


def regression_nll(model: nn.Linear):
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


def test_empirical_fisher_of_softmax_regression() -> None:
    model, x, y = softmax_regression()
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    weight, bias = outer_squares(p - F.one_hot(y, p.shape[1]).float(), x)
    fast = squared_gradient_sums(model, dict(model.named_parameters()), ToyNLL(regression_nll(model), x, y))
    torch.testing.assert_close(fast["weight"], weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast["bias"], bias, rtol=1e-5, atol=1e-7)


def test_sampled_fisher_converges_to_true_fisher_of_softmax_regression() -> None:
    model, x, _ = softmax_regression()
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    classes = p.shape[1]
    # True Fisher: E_{y~p}[((p - e_y) ⊗ x)²] = Σ_c p_c ((p - e_c) ⊗ x)².
    true_w, true_b = torch.zeros(classes, x.shape[1]), torch.zeros(classes)
    for c in range(classes):
        w, b = outer_squares((p - F.one_hot(torch.full((len(x),), c), classes)) * p[:, c : c + 1].sqrt(), x)
        true_w, true_b = true_w + w, true_b + b
    truth = torch.cat([true_w.flatten(), true_b])

    def estimate(draws: int) -> float:
        generator = torch.Generator().manual_seed(draws)
        xs = x.repeat(draws, 1)
        ys = torch.multinomial(p.repeat(draws, 1), 1, replacement=True, generator=generator).squeeze(1)
        fast = squared_gradient_sums(model, dict(model.named_parameters()), ToyNLL(regression_nll(model), xs, ys))
        return relative_error(torch.cat([fast["weight"].flatten(), fast["bias"]]) / draws, truth)

    few, many = estimate(20), estimate(4000)
    assert many < 0.05
    assert many < few / 3


# --------------------------------------------------------------------------------------------------------------
# 4-6. Precision, chunking, no trace left on the model
# --------------------------------------------------------------------------------------------------------------


def test_bf16_model_gives_fp32_close_to_fp32_model() -> None:
    batch = padded_batch([10, 8, 6])
    full = tiny_llama()
    half = tiny_llama().to(torch.bfloat16)
    ref = squared_gradient_sums(full, dict(full.named_parameters()), causal_lm_nll(full, batch))
    nll = causal_lm_nll(half, batch)
    low = squared_gradient_sums(half, dict(half.named_parameters()), nll)
    oracle = squared_gradient_sums_loop(half, dict(half.named_parameters()), nll.split())
    for name in ref:
        assert low[name].dtype == torch.float32
        assert relative_error(low[name], ref[name]) < 0.05, name
        assert relative_error(low[name], oracle[name]) < 0.03, name


@pytest.mark.parametrize("kind", ["llama_tied", "llama_lora", "gpt2_conv1d_tied"])
def test_chunking_changes_nothing(kind: str) -> None:
    model = MODELS[kind]()
    params = trainable(model)
    nll = causal_lm_nll(model, padded_batch([10, 3, 7, 8, 5]))
    whole = squared_gradient_sums(model, params, nll, chunk_size=5)
    for chunk in (1, 2, None):
        assert_sums_close(squared_gradient_sums(model, params, nll, chunk_size=chunk), whole, rtol=1e-6)


def test_default_chunks_bound_the_memory_of_the_largest_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    from fishmerge.fisher import persample

    model = MODELS["llama_tied"]()
    params = trainable(model)
    largest = max(p.numel() for p in params.values())
    monkeypatch.setattr(persample, "AUTO_CHUNK_BYTES", 2 * 4 * largest)  # room for two examples at a time
    seen: list[list[tuple[int, int]]] = []
    original = persample._Engine._chunks

    def recording(self):
        pieces = list(original(self))
        seen.append(pieces)
        return iter(pieces)

    monkeypatch.setattr(persample._Engine, "_chunks", recording)
    nll = causal_lm_nll(model, padded_batch([10, 3, 7, 8, 5]))
    auto = squared_gradient_sums(model, params, nll)
    assert seen and all(hi - lo <= 2 for pieces in seen for lo, hi in pieces)
    assert any(len(pieces) == 3 for pieces in seen)  # 5 examples in chunks of 2, 2 and 1
    assert_sums_close(auto, squared_gradient_sums(model, params, nll, chunk_size=5), rtol=1e-6)


@pytest.mark.parametrize("per_example", [True, False])
def test_model_state_is_restored(per_example: bool) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    params = {name: p for name, p in model.named_parameters() if "layers.1" in name or "embed" in name}
    params["frozen"] = frozen
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    squared_gradient_sums(model, params, causal_lm_nll(model, padded_batch([10, 4])), per_example=per_example)

    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_training_mode_is_refused() -> None:
    model = tiny_llama().train()
    with pytest.raises(FishmergeError, match="eval"):
        squared_gradient_sums(model, dict(model.named_parameters()), causal_lm_nll(model, padded_batch([5])))


def test_parameter_used_outside_its_module_is_caught(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    mix = nn.Linear(6, 6)
    model = nn.ModuleDict({"emb": emb, "mix": mix}).eval()

    def per_example(x: Tensor, y: Tensor) -> Tensor:
        logits = torch.tanh(mix(emb(x))) @ emb.weight.T  # tied read-out through the child's weight
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)

    x, y = torch.randint(0, 10, (4, 5)), torch.randint(0, 10, (4, 5))
    nll = ToyNLL(per_example, x, y)
    params = dict(model.named_parameters())
    with caplog.at_level(logging.WARNING, logger="fishmerge.fisher.persample"):
        fast = squared_gradient_sums(model, params, nll)
    assert "outside its own module" in caplog.text
    assert_sums_close(fast, squared_gradient_sums_loop(model, params, nll.split()))
    # Later passes over the same model start from the first pass's verdict, without watching again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fishmerge.fisher.persample"):
        again = squared_gradient_sums(model, params, nll)
    assert "outside its own module" in caplog.text
    assert_sums_close(again, fast)
