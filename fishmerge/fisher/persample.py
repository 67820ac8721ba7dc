"""Exact per-example squared-gradient sums, the core of every diagonal Fisher estimate.

For examples k = 1..B with per-example negative log-likelihoods l_k(θ), :func:`squared_gradient_sums` returns
Σ_k g_k ⊙ g_k with g_k = ∇_θ l_k, exactly (to float rounding), at roughly the cost of one training step.

How (SPEC §1, cost note): the estimated parameters are frozen for the duration, so autograd never forms the
ordinary weight-gradient GEMMs; forward hooks on the modules that own them save their inputs and catch the
gradient of their outputs, and per-layer rules turn (input, output gradient) into per-example weight gradients:

* ``nn.Linear``: G_k = Σ_t δ_{k,t} x_{k,t}ᵀ, one batched GEMM (Goodfellow 2015, "Efficient Per-Example Gradient
  Computations", arXiv 1510.01799; the same trick as Opacus and BackPACK's ``BatchGrad``).
* ``nn.Embedding``: rows of G_k are segment sums of δ_k by token id, done sparsely on (example, id) keys.
* any other leaf module: a per-example vector-Jacobian product of the module alone, vmapped over examples
  (the ``torch.func`` per-sample-gradient recipe), still exact because the module sees one example's input.

A parameter used more than once (tied embeddings and LM head, a module called twice) needs Σ_k (Σ_u G_{k,u})²,
so its contributions are kept until all have arrived and summed per example before squaring. Whatever the rules
cannot cover falls back to a per-example backward loop over the closure's ``example_nlls``, with a warning: a
parameter owned by a non-leaf module or a forward-less container (PEFT's ``lora_embedding_A``), a call the rules
cannot split by example (keyword arguments, inputs not batched on dim 0), or a differentiable use of a parameter
outside its module's forward (caught by a ``TorchFunctionMode`` while the forward runs).

Assumptions, checked where it is cheap: eval mode; every hooked module's inputs are batched by example on dim 0
(an Embedding looked up with one row of ids shared by the batch, like GPT-2's position ids, is expanded to the
batch); no activation checkpointing (refused: recomputed forwards would be counted twice); inputs of hooked
modules are not modified in place after the call (refused).

The per-example Fisher estimators built on top: the *empirical* Fisher uses observed labels, the *sampled*
(Monte Carlo true) Fisher draws labels from the model itself; Kunstner, Hennig & Balles 2019, "Limitations of the
Empirical Fisher Approximation for Natural Gradient Descent" (arXiv 1905.12558), and Martens 2020, "New Insights
and Perspectives on the Natural Gradient Method" (JMLR 21), explain why the two differ.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fishmerge.errors import FishmergeError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

__all__ = ["CausalLMNLL", "causal_lm_nll", "squared_gradient_sums"]


# --------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------


def squared_gradient_sums(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    nll: Callable[[], Tensor],
    *,
    per_example: bool = True,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Sums of squared gradients over the examples of one batch.

    Args:
        model: The model ``nll`` runs. Must be in eval mode (no dropout, no batch statistics) so that examples
            are independent; with right padding and an attention mask, padding does not reach real tokens.
        params: The parameters to estimate, keyed by name. They must belong to modules of ``model``; the same
            parameter may appear under several names (each gets the same result).
        nll: Runs the forward pass and returns the sum over the batch's examples of each example's negative
            log-likelihood (a scalar). It is called once, or again after a fallback decision, so it must be
            repeatable. If it exposes an ``example_nlls`` attribute (the per-example vector after each call, as
            :class:`CausalLMNLL` does) parameters that no per-layer rule covers are handled by a per-example loop.
        per_example: ``True``: Σ_k g_k ⊙ g_k. ``False``: the ``batch`` estimator's raw sum (Σ_k g_k)², one ordinary
            backward; it is biased for the Fisher (the cross terms g_j ⊙ g_k do not vanish) and the caller scales it.
        chunk_size: At most this many examples have their per-example weight gradients materialised at once
            (``None``: as many as keep the largest parameter's under 1 GiB of fp32, :data:`AUTO_CHUNK_BYTES`).

    Returns:
        fp32 tensors shaped like the parameters, keyed like ``params``.

    Raises:
        FishmergeError: The model is in training mode, a parameter is not owned by a module of ``model``, or a
            parameter needs the per-example loop but ``nll`` does not expose ``example_nlls``.
    """
    if chunk_size is not None and chunk_size < 1:
        raise FishmergeError(f"chunk_size must be a positive integer or None, got {chunk_size}")
    slots, names = _unique_parameters(params)
    _require_eval(model)
    if not per_example:
        sums = _batch_gradient_squares(model, slots, nll)
    else:
        sums = _per_example_sums(model, slots, nll, chunk_size)
    return {name: sums[slot] for slot, group in enumerate(names) for name in group}


# --------------------------------------------------------------------------------------------------------------
# Causal LM negative log-likelihood closures
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CausalLMNLL:
    """The ``nll`` closure of a causal LM batch, with the bookkeeping the Fisher metadata needs.

    Calling it runs the model and returns Σ_k l_k, where l_k sums −log p(y_t | x_<t) over example k's target
    positions (``labels[:, 1:] != -100`` and attended). With ``sampled=True`` the targets y_t are drawn from the
    model's own predictive distribution at those positions (teacher-forced on the observed prefix), which makes
    Σ_k g_k ⊙ g_k an unbiased Monte Carlo estimate of the true Fisher (Kunstner et al. 2019, §3). They are drawn
    once, on the first call or the first read of :attr:`labels`, and reused afterwards, so an oracle can see
    the very same targets (see :meth:`split`).

    Attributes:
        n_examples: Rows in the batch.
        n_tokens: Target tokens in the batch (padding and ``-100`` excluded); the same for both estimators.
        example_nlls: The per-example NLLs of the last call (graph attached), or ``None`` before the first.
    """

    model: nn.Module
    input_ids: Tensor
    attention_mask: Tensor
    observed_labels: Tensor
    sampled: bool = False
    generator: torch.Generator | None = None
    n_examples: int = field(init=False)
    n_tokens: int = field(init=False)
    example_nlls: Tensor | None = field(init=False, default=None)
    _labels: Tensor | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.n_examples = int(self.input_ids.shape[0])
        self.n_tokens = int(self.target_mask().sum())
        if not self.sampled:
            self._labels = self.observed_labels

    def target_mask(self) -> Tensor:
        """Boolean (B, T-1): which next-token predictions count."""
        return (self.observed_labels[:, 1:] != IGNORE_INDEX) & self.attention_mask[:, 1:].bool()

    @property
    def labels(self) -> Tensor:
        """The targets in Hugging Face alignment (observed, or drawn; ``-100`` elsewhere)."""
        if self._labels is None:
            with torch.no_grad():
                self._draw(self._logits())
        assert self._labels is not None
        return self._labels

    def __call__(self) -> Tensor:
        logits = self._logits()
        if self._labels is None:
            # Draw from this pass's logits instead of running a separate no-grad forward.
            self._draw(logits.detach())
        self.example_nlls = _per_example_token_nll(logits, self.labels, self.attention_mask)
        return self.example_nlls.sum()

    def split(self) -> list[CausalLMNLL]:
        """One empirical closure per example on this batch's targets (drawn ones included), cut to the last
        attended position: the inputs the batch-1 oracle needs."""
        labels = self.labels
        parts = []
        for k in range(self.n_examples):
            length = _attended_length(self.attention_mask[k])
            parts.append(
                CausalLMNLL(
                    self.model,
                    self.input_ids[k : k + 1, :length],
                    self.attention_mask[k : k + 1, :length],
                    labels[k : k + 1, :length],
                )
            )
        return parts

    def _logits(self) -> Tensor:
        return self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, use_cache=False).logits

    def _draw(self, logits: Tensor) -> None:
        mask = self.target_mask()
        probs = torch.softmax(logits[:, :-1][mask].float(), dim=-1)
        labels = torch.full_like(self.observed_labels, IGNORE_INDEX)
        if probs.shape[0] > 0:
            drawn = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            labels[:, 1:][mask] = drawn
        self._labels = labels


def causal_lm_nll(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    sampled: bool = False,
    generator: torch.Generator | None = None,
) -> CausalLMNLL:
    """Builds the ``nll`` closure of :func:`squared_gradient_sums` for a causal LM batch.

    Args:
        model: A Hugging Face causal LM (or a PEFT model around one) returning ``.logits``.
        batch: ``input_ids`` and ``attention_mask`` (B, T); ``labels`` aligned with ``input_ids`` (the shift
            happens here: ``logits[:, :-1]`` predict ``labels[:, 1:]``), ``-100`` marking non-targets. Without
            ``labels``, every attended next token is a target.
        sampled: Draw the targets from the model (Monte Carlo true Fisher) instead of using the observed ones.
        generator: Seeds the draws; on the logits' device.

    Returns:
        A callable :class:`CausalLMNLL`; read ``n_tokens`` from it for the Fisher metadata.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = batch.get("labels")
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return CausalLMNLL(model, input_ids, attention_mask, labels, sampled=sampled, generator=generator)


def _per_example_token_nll(logits: Tensor, labels: Tensor, attention_mask: Tensor) -> Tensor:
    targets = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.view(targets.shape).sum(dim=1)


def _attended_length(mask_row: Tensor) -> int:
    attended = mask_row.nonzero()
    return int(attended.max()) + 1 if attended.numel() else 0


# --------------------------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------------------------


def _unique_parameters(params: Mapping[str, nn.Parameter]) -> tuple[list[nn.Parameter], list[list[str]]]:
    """Deduplicates by identity: a tied parameter listed under two names is one parameter with one Fisher."""
    slots: list[nn.Parameter] = []
    names: list[list[str]] = []
    index: dict[int, int] = {}
    for name, param in params.items():
        if id(param) not in index:
            index[id(param)] = len(slots)
            slots.append(param)
            names.append([])
        names[index[id(param)]].append(name)
    return slots, names


def _require_eval(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if training:
        raise FishmergeError(
            f"per-example Fisher estimation needs eval mode (dropout off, examples independent), but "
            f"{training[0]!r} is in training mode: call model.eval() first"
        )


@contextlib.contextmanager
def _only_trainable(model: nn.Module, trainable: Sequence[nn.Parameter]) -> Iterator[None]:
    """Freezes every parameter except ``trainable`` and puts back ``requires_grad`` and ``.grad`` afterwards,
    even on error, so estimating never leaves a trace on the model."""
    everything = {id(p): p for p in model.parameters()}
    everything.update({id(p): p for p in trainable})
    flags = {key: p.requires_grad for key, p in everything.items()}
    grads = {id(p): p.grad for p in trainable}
    try:
        for p in everything.values():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield
    finally:
        for key, p in everything.items():
            p.requires_grad_(flags[key])
        for p in trainable:
            p.grad = grads[id(p)]


def _batch_gradient_squares(model: nn.Module, slots: Sequence[nn.Parameter], nll: Callable[[], Tensor]) -> list[Tensor]:
    with _only_trainable(model, slots):
        loss = nll()
        grads = torch.autograd.grad(loss, slots, allow_unused=True) if loss.requires_grad else [None] * len(slots)
    return [
        torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else g.float().square()
        for p, g in zip(slots, grads)
    ]


def _loop_over_examples(example_nlls: Tensor, slots: Sequence[nn.Parameter]) -> list[Tensor]:
    """The per-example backward loop for parameters no per-layer rule covers; keeps the graph for the hooks."""
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in slots]
    for loss in example_nlls:
        grads = torch.autograd.grad(loss, slots, retain_graph=True, allow_unused=True)
        for total, g in zip(sums, grads):
            if g is not None:
                total.add_(g.float().square())
    return sums


# --------------------------------------------------------------------------------------------------------------
# The hooked pass
# --------------------------------------------------------------------------------------------------------------


class _Unhookable(Exception):
    """Raised from inside a hook: these slots need the loop, so the pass restarts with them in it."""

    def __init__(self, slots: set[int], reason: str) -> None:
        super().__init__(reason)
        self.slots = slots
        self.reason = reason


# Whether a model uses a parameter outside its owning module's forward is a property of its code, not of the
# batch. The watch that finds out costs a Python call per torch op (~20% of a small model's pass), so it runs
# on the first pass of each (model, parameters) pair and later passes start from that pass's verdict.
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], tuple[frozenset[int], dict[int, str]]]] = (
    weakref.WeakKeyDictionary()
)


def _per_example_sums(
    model: nn.Module, slots: list[nn.Parameter], nll: Callable[[], Tensor], chunk_size: int | None
) -> list[Tensor]:
    owners = _owners(model, slots)
    key = tuple(id(p) for p in slots)
    verdict = _VERDICTS.get(model, {}).get(key)
    if verdict is None:
        fallback = _static_fallback(owners)
        reasons = {slot: "owned by a module that is not a callable leaf" for slot in fallback}
    else:
        fallback, reasons = set(verdict[0]), dict(verdict[1])
    while True:
        try:
            sums = _hooked_pass(model, slots, owners, fallback, nll, chunk_size, reasons, watch=verdict is None)
        except _Unhookable as err:
            # A slot caught mid-pass cannot be split between the rules and the loop: start again with it looped.
            assert not err.slots <= fallback, "a looped parameter was hooked"
            fallback |= err.slots
            reasons.update({slot: err.reason for slot in err.slots})
            continue
        _VERDICTS.setdefault(model, {})[key] = (frozenset(fallback), reasons)
        if fallback:
            _warn_fallback(owners, sorted(fallback), reasons)
        return sums


def _owners(model: nn.Module, slots: Sequence[nn.Parameter]) -> dict[nn.Module, dict[str, int]]:
    index = {id(p): slot for slot, p in enumerate(slots)}
    owners: dict[nn.Module, dict[str, int]] = {}
    found: set[int] = set()
    for module in model.modules():
        for local, param in module._parameters.items():
            if param is not None and id(param) in index:
                owners.setdefault(module, {})[local] = index[id(param)]
                found.add(index[id(param)])
    missing = [slot for slot in range(len(slots)) if slot not in found]
    if missing:
        raise FishmergeError(
            f"{len(missing)} of the parameters to estimate are not parameters of the model's modules "
            f"(shape {tuple(slots[missing[0]].shape)}): pass parameters taken from model.named_parameters()"
        )
    return owners


def _rule_for(module: nn.Module) -> type[_Use] | None:
    # Exact type checks on forward: a subclass that overrides forward (quantised layers, ...) is not a plain
    # Linear, and only the generic rule is exact for it.
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return _LinearUse
    if type(module).forward is nn.Embedding.forward and isinstance(module, nn.Embedding):
        return _EmbeddingUse
    if next(module.children(), None) is None and type(module).forward is not nn.Module.forward:
        return _GenericUse
    # Non-leaf owners, and containers without a forward (ParameterDict, ParameterList) whose parameters are
    # used by the parent's forward: no per-layer view of these uses exists.
    return None


def _static_fallback(owners: Mapping[nn.Module, Mapping[str, int]]) -> set[int]:
    return {slot for module, local in owners.items() if _rule_for(module) is None for slot in local.values()}


def _hooked_pass(
    model: nn.Module,
    slots: list[nn.Parameter],
    owners: Mapping[nn.Module, Mapping[str, int]],
    fallback: set[int],
    nll: Callable[[], Tensor],
    chunk_size: int | None,
    reasons: Mapping[int, str],
    *,
    watch: bool,
) -> list[Tensor]:
    looped = sorted(fallback)
    engine = _Engine(slots, chunk_size)
    watched = {id(p): slot for slot, p in enumerate(slots) if slot not in fallback} if watch else {}
    with _only_trainable(model, [slots[s] for s in looped]), engine.attached(model, owners, fallback):
        with _UseWatch(engine, watched) if watched else contextlib.nullcontext():
            loss = nll()
        engine.forward_done = True
        loop_sums: list[Tensor] = []
        if looped:
            example_nlls = getattr(nll, "example_nlls", None)
            if example_nlls is None:
                raise FishmergeError(
                    f"{len(looped)} parameters need the per-example loop ({reasons[looped[0]]}), but the nll "
                    "closure does not expose example_nlls: build it with causal_lm_nll or set that attribute"
                )
            engine.enabled = False
            loop_sums = _loop_over_examples(example_nlls, [slots[s] for s in looped])
            engine.enabled = True
        if loss.requires_grad:
            loss.backward()
        engine.finish()
    for slot, total in zip(looped, loop_sums):
        engine.sums[slot] = total
    return engine.sums


def _warn_fallback(
    owners: Mapping[nn.Module, Mapping[str, int]], looped: Sequence[int], reasons: Mapping[int, str]
) -> None:
    kinds = sorted({type(m).__name__ for m, local in owners.items() if set(local.values()) & set(looped)})
    logger.warning(
        "%d parameters (in %s) are estimated with a per-example backward loop, slower than the per-layer rules: %s",
        len(looped),
        ", ".join(kinds),
        reasons[looped[0]],
    )


# --------------------------------------------------------------------------------------------------------------
# One call of an owning module, and the rules that turn it into per-example gradients
# --------------------------------------------------------------------------------------------------------------


class _Use:
    """One call of a module that owns estimated parameters: its inputs, and later its output gradient."""

    def __init__(self, module: nn.Module, args: tuple[Any, ...], local: Mapping[str, int]) -> None:
        self.module = module
        self.args = args
        self.local = dict(local)
        self.versions = [a._version for a in args if isinstance(a, Tensor)]
        self.grad_output: Tensor | None = None

    @staticmethod
    def accepts(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_size: int) -> str | None:
        """``None`` if this rule can split the call by example, else why not."""
        raise NotImplementedError

    @staticmethod
    def prepare(args: tuple[Any, ...], batch_size: int) -> tuple[Any, ...]:
        """The call's positional arguments, rewritten if the rule needs them batched (``args`` if not)."""
        return args

    def inputs_unchanged(self) -> bool:
        return self.versions == [a._version for a in self.args if isinstance(a, Tensor)]

    def add_into(self, bufs: Mapping[str, Tensor], lo: int, hi: int) -> None:
        """Adds examples lo..hi's gradients of the local parameters in ``bufs`` into them ((hi-lo, *shape))."""
        for local, grad in self.grads(list(bufs), lo, hi).items():
            bufs[local].add_(grad)

    def square_sums(self, locals_: Sequence[str], lo: int, hi: int) -> dict[str, Tensor]:
        """Σ over examples lo..hi of the squared per-example gradients, fp32."""
        # grads() returns fresh tensors, so they are squared in place: no second (examples, *shape) buffer.
        return {local: grad.square_().sum(0) for local, grad in self.grads(locals_, lo, hi).items()}

    def grads(self, locals_: Sequence[str], lo: int, hi: int) -> dict[str, Tensor]:
        """Dense per-example gradients of examples lo..hi, fp32, shaped (hi-lo, *param.shape)."""
        raise NotImplementedError


class _LinearUse(_Use):
    """Goodfellow (2015): the per-example weight gradient of y = x Wᵀ + b is Σ_t δ_t x_tᵀ over the example's
    positions, one batched GEMM with the FLOPs of the ordinary weight gradient; the bias gradient is Σ_t δ_t."""

    @staticmethod
    def accepts(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_size: int) -> str | None:
        x = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] != batch_size:
            return "a Linear called without one input batched on dim 0"
        return None

    def grads(self, locals_: Sequence[str], lo: int, hi: int) -> dict[str, Tensor]:
        assert self.grad_output is not None
        delta = self.grad_output[lo:hi].float()
        delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])
        out: dict[str, Tensor] = {}
        if "weight" in locals_:
            x = self.args[0][lo:hi].float()
            out["weight"] = torch.bmm(delta.transpose(1, 2), x.reshape(x.shape[0], -1, x.shape[-1]))
        if "bias" in locals_:
            out["bias"] = delta.sum(1)
        return out


class _EmbeddingUse(_Use):
    """Per-example embedding gradients are segment sums of δ by token id; keyed on (example, id) pairs they
    stay sparse, so no (examples × vocab × dim) tensor is formed unless a tied weight needs one."""

    @staticmethod
    def prepare(args: tuple[Any, ...], batch_size: int) -> tuple[Any, ...]:
        ids = args[0] if len(args) == 1 else None
        if isinstance(ids, Tensor) and ids.dim() >= 1 and ids.shape[0] == 1 and batch_size > 1:
            # One row of ids shared by the batch (GPT-2's position ids, shape (1, T)): its output is broadcast
            # against per-example activations, and its gradient arrives summed over examples. Looking the row
            # up once per example gives the same forward and keeps each example's gradient apart; this assumes
            # the output is only broadcast, never indexed by example, as in every such model we know.
            return (ids.expand(batch_size, *ids.shape[1:]),)
        return args

    @staticmethod
    def accepts(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_size: int) -> str | None:
        ids = args[0] if len(args) == 1 and not kwargs else None
        if not isinstance(ids, Tensor) or ids.dim() < 1 or ids.shape[0] != batch_size:
            return "an Embedding called without one id tensor batched on dim 0"
        return None

    def _rows(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Unique keys example·V + id of examples lo..hi and the gradient row of each."""
        assert self.grad_output is not None
        module: nn.Embedding = self.module  # type: ignore[assignment]
        vocab = module.num_embeddings
        ids = self.args[0][lo:hi].reshape(hi - lo, -1)
        delta = self.grad_output[lo:hi].float().reshape(-1, module.embedding_dim)
        example = torch.arange(hi - lo, device=ids.device).repeat_interleave(ids.shape[1])
        ids = ids.reshape(-1)
        if module.padding_idx is not None:
            # F.embedding gives the padding row no gradient.
            keep = ids != module.padding_idx
            ids, delta, example = ids[keep], delta[keep], example[keep]
        keys, inverse = torch.unique(example * vocab + ids, return_inverse=True)
        rows = delta.new_zeros(keys.shape[0], delta.shape[1]).index_add_(0, inverse, delta)
        if module.scale_grad_by_freq:
            # Frequencies are counted within the example: that is the example's own gradient.
            rows /= torch.bincount(inverse, minlength=keys.shape[0]).unsqueeze(1).to(rows.dtype)
        return keys, rows

    def add_into(self, bufs: Mapping[str, Tensor], lo: int, hi: int) -> None:
        keys, rows = self._rows(lo, hi)
        buf = bufs["weight"]
        buf.view(-1, buf.shape[-1]).index_add_(0, keys, rows)

    def square_sums(self, locals_: Sequence[str], lo: int, hi: int) -> dict[str, Tensor]:
        keys, rows = self._rows(lo, hi)
        module: nn.Embedding = self.module  # type: ignore[assignment]
        total = rows.new_zeros(module.num_embeddings, module.embedding_dim)
        return {"weight": total.index_add_(0, keys % module.num_embeddings, rows.square())}


class _GenericUse(_Use):
    """Any leaf module: the per-example vector-Jacobian product of the module alone (``torch.func.vjp`` of
    ``functional_call`` on one example, vmapped over examples), exact because the module sees one example."""

    @staticmethod
    def accepts(args: tuple[Any, ...], kwargs: Mapping[str, Any], batch_size: int) -> str | None:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if kwargs or not tensors or any(t.dim() == 0 or t.shape[0] != batch_size for t in tensors):
            return "a module called with keyword arguments or inputs not batched on dim 0"
        return None

    def grads(self, locals_: Sequence[str], lo: int, hi: int) -> dict[str, Tensor]:
        assert self.grad_output is not None
        module = self.module
        primals = {local: module.get_parameter(local).detach() for local in locals_}
        in_dims = tuple(0 if isinstance(a, Tensor) else None for a in self.args)
        sliced = tuple(a[lo:hi] if isinstance(a, Tensor) else a for a in self.args)

        def one_example(args: tuple[Any, ...], delta: Tensor) -> dict[str, Tensor]:
            # Keep a batch dimension of one: modules may rely on the batched layout.
            batched = tuple(a.unsqueeze(0) if isinstance(a, Tensor) else a for a in args)
            _, vjp = torch.func.vjp(lambda p: torch.func.functional_call(module, p, batched), primals)
            return vjp(delta.unsqueeze(0))[0]

        per_example = torch.func.vmap(one_example, in_dims=(in_dims, 0))(sliced, self.grad_output[lo:hi])
        return {local: grad.float() for local, grad in per_example.items()}


# --------------------------------------------------------------------------------------------------------------
# The engine: hooks, bookkeeping of uses, chunked square-and-sum
# --------------------------------------------------------------------------------------------------------------


# Without an explicit chunk size, a chunk holds at most this many bytes of per-example gradients of the largest
# parameter: whole batches for small models, a few examples at a time for a 1B model's 32000 x 2048 LM head.
AUTO_CHUNK_BYTES = 1 << 30


def _auto_chunk_size(slots: Sequence[nn.Parameter]) -> int:
    largest = max((p.numel() for p in slots), default=1)
    return max(1, AUTO_CHUNK_BYTES // (4 * max(largest, 1)))


class _Engine:
    def __init__(self, slots: Sequence[nn.Parameter], chunk_size: int | None) -> None:
        self.slots = slots
        self.chunk_size = chunk_size or _auto_chunk_size(slots)
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in slots]
        self.expected = [0] * len(slots)
        self.arrived: list[list[_Use]] = [[] for _ in slots]
        self.done = [False] * len(slots)
        self.running = [0] * len(slots)
        self.batch_size: int | None = None
        self.enabled = True
        self.forward_done = False

    @contextlib.contextmanager
    def attached(
        self, model: nn.Module, owners: Mapping[nn.Module, Mapping[str, int]], fallback: set[int]
    ) -> Iterator[None]:
        handles = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)]
        try:
            for module, local in owners.items():
                hooked = {name: slot for name, slot in local.items() if slot not in fallback}
                rule = _rule_for(module)
                if hooked and rule is not None:
                    handles.append(module.register_forward_pre_hook(self._pre_hook(rule, hooked), with_kwargs=True))
                    handles.append(module.register_forward_hook(self._post_hook(rule, hooked), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _active(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def _on_model_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        named = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
        first = next((a for a in (*named, *args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if self._active() and first is not None and first.dim() > 0:
            self.batch_size = int(first.shape[0])

    def _pre_hook(self, rule: type[_Use], local: Mapping[str, int]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self._active():
                return None
            if self.forward_done:
                raise FishmergeError(
                    f"a {type(module).__name__} owning estimated parameters ran again during the backward pass "
                    "(activation checkpointing recomputes forwards): turn gradient checkpointing off to estimate"
                )
            if self.batch_size is None:
                # Closure bypassed the model's own forward: trust the first hooked input's leading dimension.
                first = next((a for a in args if isinstance(a, Tensor) and a.dim() > 0), None)
                self.batch_size = int(first.shape[0]) if first is not None else None
            if self.batch_size is None:
                raise _Unhookable(set(local.values()), "no batch dimension found")
            prepared = rule.prepare(args, self.batch_size)
            reason = rule.accepts(prepared, kwargs, self.batch_size)
            if reason is not None:
                raise _Unhookable(set(local.values()), reason)
            for slot in local.values():
                self.running[slot] += 1
            return None if prepared is args else (prepared, kwargs)

        return hook

    def _post_hook(self, rule: type[_Use], local: Mapping[str, int]) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Tensor | None:
            if not self._active():
                return None
            for slot in local.values():
                self.running[slot] -= 1
            if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != self.batch_size:
                raise _Unhookable(set(local.values()), f"a {type(module).__name__} whose output is not batched")
            replaced = None
            if not output.requires_grad:
                if not output.is_floating_point():
                    raise _Unhookable(set(local.values()), f"a {type(module).__name__} with a non-float output")
                # Nothing upstream needs gradients (frozen weights, integer inputs): start the graph here,
                # like transformers' enable_input_require_grads. Adding a zero leaf, rather than making the
                # output itself a leaf, keeps later in-place updates of the output legal.
                anchor = output.new_zeros(()).requires_grad_(True)
                output = replaced = output + anchor
            use = rule(module, args, local)
            for slot in local.values():
                self.expected[slot] += 1
            output.register_hook(lambda grad: self._on_grad(use, grad))
            return replaced

        return hook

    def _on_grad(self, use: _Use, grad: Tensor) -> None:
        if not self.enabled:
            return
        if not use.inputs_unchanged():
            # Autograd would refuse this too once the parameter is trainable; say so instead of being wrong.
            raise FishmergeError(
                f"an input of a {type(use.module).__name__} owning estimated parameters was modified in place after "
                "the call, so its per-example gradient cannot be formed: make that update out of place"
            )
        use.grad_output = grad
        ready = []
        for slot in use.local.values():
            self.arrived[slot].append(use)
            if len(self.arrived[slot]) == self.expected[slot]:
                ready.append(slot)
        self._finalize(ready)

    def finish(self) -> None:
        """Squares what arrived for slots some of whose uses never got a gradient (outputs off the loss path)."""
        self._finalize([slot for slot in range(len(self.slots)) if not self.done[slot] and self.arrived[slot]])

    def _chunks(self) -> Iterator[tuple[int, int]]:
        total = self.batch_size or 0
        for lo in range(0, total, self.chunk_size):
            yield lo, min(lo + self.chunk_size, total)

    def _finalize(self, ready: Sequence[int]) -> None:
        self.enabled = False  # the generic rule re-enters module forwards
        try:
            singles: dict[int, tuple[_Use, list[str]]] = {}
            shared = []
            for slot in ready:
                uses = self.arrived[slot]
                if len(uses) == 1:
                    local = next(name for name, s in uses[0].local.items() if s == slot)
                    singles.setdefault(id(uses[0]), (uses[0], []))[1].append(local)
                else:
                    shared.append(slot)
            for use, locals_ in singles.values():
                self._square_single(use, locals_)
            if shared:
                self._square_shared(shared)
            for slot in ready:
                self.arrived[slot] = []  # frees the saved activations
                self.done[slot] = True
        finally:
            self.enabled = True

    def _square_single(self, use: _Use, locals_: Sequence[str]) -> None:
        for lo, hi in self._chunks():
            for local, total in use.square_sums(locals_, lo, hi).items():
                self.sums[use.local[local]].add_(total)

    def _square_shared(self, shared: Sequence[int]) -> None:
        """Σ_k (Σ_u G_{k,u})²: a parameter's contributions from all its uses are summed per example first."""
        uses = {id(u): u for slot in shared for u in self.arrived[slot]}.values()
        for lo, hi in self._chunks():
            bufs = {slot: self.sums[slot].new_zeros(hi - lo, *self.sums[slot].shape) for slot in shared}
            for use in uses:
                mine = {local: bufs[slot] for local, slot in use.local.items() if slot in bufs}
                use.add_into(mine, lo, hi)
            for slot, buf in bufs.items():
                self.sums[slot].add_(buf.square().sum(0))


class _UseWatch(TorchFunctionMode):
    """Catches a differentiable use of an estimated parameter outside its owning module's forward (a parent
    doing ``h @ child.weight.T``, say): the per-layer rules would silently miss it, so the pass restarts with
    that parameter in the loop. Reads that cannot carry a gradient (shape, dtype, no-grad copies) pass."""

    def __init__(self, engine: _Engine, watched: Mapping[int, int]) -> None:
        super().__init__()
        self.engine = engine
        self.watched = watched

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.watched and self.engine._active() and _carries_gradient(out):
            for arg in _shallow_leaves(args, kwargs):
                slot = self.watched.get(id(arg))
                if slot is not None and not self.engine.running[slot]:
                    raise _Unhookable({slot}, "a parameter used outside its own module's forward")
        return out


def _shallow_leaves(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[Any]:
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, (list, tuple)):
            yield from arg
        else:
            yield arg


def _carries_gradient(out: Any) -> bool:
    items = out if isinstance(out, (list, tuple)) else (out,)
    return any(isinstance(t, Tensor) and t.is_floating_point() for t in items)
