"""The reference oracle for per-example squared-gradient sums: one ordinary backward per example.

Slow (one backward pass per example, plus the weight-gradient GEMMs the fast path avoids) and obviously
correct; tests compare :func:`fishmerge.fisher.persample.squared_gradient_sums` against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["squared_gradient_sums_loop"]


def squared_gradient_sums_loop(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    example_nlls: Sequence[Callable[[], Tensor]],
) -> dict[str, Tensor]:
    """Σ_k g_k ⊙ g_k with one backward per example (a batch-1 loop).

    Args:
        model: The model the closures run (kept for symmetry with the fast path; only ``params`` have their
            ``requires_grad`` flags changed, and restored).
        params: The parameters to estimate, keyed by name; a parameter listed under two names gets one sum.
        example_nlls: One closure per example, each returning that example's negative log-likelihood.

    Returns:
        fp32 tensors shaped like the parameters, keyed like ``params``.
    """
    unique = list({id(p): p for p in params.values()}.values())
    sums = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in unique}
    flags = {id(p): p.requires_grad for p in unique}
    try:
        for p in unique:
            p.requires_grad_(True)
        for nll in example_nlls:
            # autograd.grad, not backward: the oracle must not leave .grad behind either.
            grads = torch.autograd.grad(nll(), unique, allow_unused=True)
            for p, g in zip(unique, grads):
                if g is not None:
                    sums[id(p)].add_(g.float().square())
    finally:
        for p in unique:
            p.requires_grad_(flags[id(p)])
    return {name: sums[id(p)] for name, p in params.items()}
