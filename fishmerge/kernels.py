"""The merge arithmetic as small pure tensor functions: no I/O, no logging, no device policy.

Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
arXiv 2111.09832) and its federated form FedFish (Dhawan et al., "Leveraging Function Space Aggregation for
Federated Learning at Scale", TMLR 2024, arXiv 2311.10291) share one formula (SPEC §2, §3):

    θ* = Σ_i λ_i (F_i + δ) ⊙ θ_i  /  Σ_i λ_i (F_i + δ)

It is split into per-input terms and one division so that the sums can be formed anywhere — in one process
reading checkpoints tensor by tensor, or across processes with an all-reduce — and finished by the same code.
All arithmetic is fp32 whatever the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def add_fisher_terms(
    numerator: Tensor,
    denominator: Tensor,
    value: Tensor,
    fisher: Tensor | None,
    weight: float,
    damping: float,
    scratch: Tensor | None = None,
) -> None:
    """Add one input's terms to the running sums, in place: ``numerator += λ_i (F_i + δ) ⊙ value`` and
    ``denominator += λ_i (F_i + δ)``.

    Args:
        numerator: fp32 running Σ a_i, shaped like ``value``.
        denominator: fp32 running Σ b_i, shaped like ``value`` (or 0-d when every ``fisher`` is None).
        value: θ_i (or a client's update Δ_i), any float dtype.
        fisher: F_i, same shape as ``value``; ``None`` means F_i ≡ 0, which turns the formula into the plain
            λ-weighted average (FedAvg) as long as ``damping`` > 0, and needs only a 0-d denominator: FedAvg's
            sums are half the size of FedFish's.
        weight: λ_i ≥ 0.
        damping: δ ≥ 0.
        scratch: an fp32 buffer shaped like ``value`` to reuse for λ_i (F_i + δ); merging large tensors
            allocates nothing per input with it (about twice as fast on a CPU).
    """
    if fisher is None:
        numerator.add_(value, alpha=weight * damping)
        denominator.add_(weight * damping)
        return
    precision = torch.add(fisher, damping, out=scratch) if scratch is not None else fisher.to(torch.float32) + damping
    precision.mul_(weight)
    denominator.add_(precision)
    numerator.addcmul_(precision, value)


def divide_sums(numerator: Tensor, denominator: Tensor, fallback: Tensor | None = None) -> Tensor:
    """Finish Σ a_i / Σ b_i element-wise.

    A coordinate whose denominator is zero (every F_i = 0 there and δ = 0) carries no information about any
    input, so it takes ``fallback`` (the λ-weighted average in a merge) or zero (no update, in a federated
    round) instead of NaN.
    """
    empty = denominator == 0
    if not bool(empty.any()):
        return numerator / denominator
    safe = numerator / torch.where(empty, torch.ones_like(denominator), denominator)
    replacement = torch.zeros_like(safe) if fallback is None else fallback.to(torch.float32)
    return torch.where(empty, replacement, safe)


def weighted_average(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ λ_i θ_i / Σ λ_i in fp32: linear merging and FedAvg (McMahan et al. 2017)."""
    _check_lengths(values, weights)
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    out = torch.zeros_like(values[0], dtype=torch.float32)
    for value, weight in zip(values, weights):
        out.add_(value, alpha=weight / total)
    return out


def fisher_merge(
    values: Sequence[Tensor],
    fishers: Sequence[Tensor],
    weights: Sequence[float],
    damping: float,
) -> Tensor:
    """Fisher-weighted average of same-shaped tensors (SPEC §2), fp32.

    Coordinates where every Fisher is zero and ``damping`` is zero fall back to the λ-weighted average;
    with ``damping`` > 0 that fallback already holds through δ.
    """
    _check_lengths(values, weights)
    if len(fishers) != len(values):
        raise ValueError(f"got {len(values)} tensors but {len(fishers)} Fishers")
    if damping < 0:
        raise ValueError("damping must be >= 0")
    numerator = torch.zeros_like(values[0], dtype=torch.float32)
    denominator = torch.zeros_like(numerator)
    scratch = torch.empty_like(numerator)
    for value, fisher, weight in zip(values, fishers, weights):
        add_fisher_terms(numerator, denominator, value, fisher, weight, damping, scratch)
    if damping > 0:
        return numerator.div_(denominator)
    return divide_sums(numerator, denominator, fallback=_lazy_average(denominator, values, weights))


def squared_norm(tensor: Tensor) -> float:
    """Σ x² in fp64, for normalising a Fisher to unit L2 norm across all of its tensors."""
    return float(tensor.to(torch.float64).square().sum())


def _lazy_average(denominator: Tensor, values: Sequence[Tensor], weights: Sequence[float]) -> Tensor | None:
    # The average is only needed (and only computed) when some coordinate has no Fisher mass at all.
    return weighted_average(values, weights) if bool((denominator == 0).any()) else None


def _check_lengths(values: Sequence[Tensor], weights: Sequence[float]) -> None:
    if not values:
        raise ValueError("nothing to merge: no tensors given")
    if len(weights) != len(values):
        raise ValueError(f"got {len(values)} tensors but {len(weights)} weights")
    if any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0")
