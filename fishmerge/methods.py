"""Registry of named merge methods. Their metadata feeds `fishmerge merge --help` and the model card."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from fishmerge import kernels
from fishmerge.citations import FEDAVG_BIBTEX, FEDFISH_BIBTEX, FISHER_MERGING_BIBTEX
from fishmerge.errors import ConfigError
from fishmerge.workspace import Workspace

# (values, fishers or None, weights, damping, workspace for its temporaries) -> merged fp32 tensor
MergeFn = Callable[[Sequence[Tensor], Sequence[Tensor] | None, Sequence[float], float, Workspace | None], Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its kernel and the words that describe it to users."""

    name: str
    summary: str
    description: str
    citations: tuple[str, ...]
    needs_fisher: bool
    kernel: MergeFn


def _average(values, fishers, weights, damping, workspace=None):
    return kernels.weighted_average(values, weights, workspace)


def _fisher(values, fishers, weights, damping, workspace=None):
    return kernels.fisher_merge(values, fishers, weights, damping, workspace)


METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            name="fisher",
            summary="Fisher-weighted average: each parameter weighted by λ_i (F_i + δ)",
            description=(
                "Fisher-weighted averaging: every parameter of every input is weighted by its diagonal Fisher "
                "information, estimated on that input's own data, times the input's weight λ_i, plus a damping δ. "
                "Parameters an input's data depends on strongly dominate the merge, so the merged model keeps "
                "each input's function on its own data better than a plain average does. This is the "
                "aggregation rule of FedFish in federated learning."
            ),
            citations=(FISHER_MERGING_BIBTEX, FEDFISH_BIBTEX),
            needs_fisher=True,
            kernel=_fisher,
        ),
        MergeMethod(
            name="average",
            summary="λ-weighted parameter average (linear merge, FedAvg)",
            description=(
                "Weighted parameter averaging (linear merging): each parameter is the λ-weighted mean of the "
                "inputs' parameters. It is the aggregation rule of FedAvg in federated learning and the "
                "baseline Fisher-weighted averaging improves on."
            ),
            citations=(FEDAVG_BIBTEX,),
            needs_fisher=False,
            kernel=_average,
        ),
    )
}


def get_method(name: str) -> MergeMethod:
    """Look a method up by name, with an error that lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"unknown merge method {name!r}: use one of {known}") from None

