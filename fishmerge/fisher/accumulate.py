"""Diagonal Fisher of a model on a dataset (SPEC §1): accumulate per-example sums, then save them.

The sums are formed here without any knowledge of processes; a driver that splits the data over processes
adds the sums and counts up (an all-reduce under Accelerate) before dividing by the total number of examples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from fishmerge import __version__
from fishmerge.checkpoint import FISHER_FORMAT, FISHER_STEM
from fishmerge.fisher.persample import causal_lm_nll, squared_gradient_sums
from fishmerge.writer import save_tensors

logger = logging.getLogger(__name__)

Estimator = Literal["empirical", "sampled", "batch"]
ESTIMATORS: dict[str, str] = {
    "empirical": "exact per-example squared gradients of the observed next tokens (empirical Fisher)",
    "sampled": "exact per-example squared gradients of next tokens sampled from the model (Monte Carlo true Fisher)",
    "batch": "batch size times the squared mean gradient of each batch: one backward per batch, BIASED "
    "(it adds the cross terms between examples of a batch); equals `empirical` at batch size 1",
}


@dataclass
class FisherSums:
    """Σ over examples of squared gradients, with the counts needed to turn them into a mean."""

    sums: dict[str, torch.Tensor]
    n_examples: int = 0
    n_tokens: int = 0
    estimator: str = "empirical"
    extra: dict[str, str] = field(default_factory=dict)

    def mean(self) -> dict[str, torch.Tensor]:
        """F = (1/n) Σ_k g_k ⊙ g_k."""
        if self.n_examples == 0:
            raise ValueError("no examples were seen, so there is no Fisher")
        return {name: total / self.n_examples for name, total in self.sums.items()}


def accumulate_fisher(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    estimator: Estimator = "empirical",
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = True,
    total: int | None = None,
) -> FisherSums:
    """Sum squared per-example gradients of the causal-LM log-likelihood over ``batches``.

    Args:
        model: a causal LM (or a PEFT model), put in eval mode here so dropout is off.
        params: the parameters to estimate, keyed by the names the Fisher will carry.
        batches: dicts with ``input_ids``, ``attention_mask`` and ``labels`` (-100 where not a target).
        estimator: ``empirical``, ``sampled`` or ``batch`` (SPEC §1).
        seed: seeds the draws of the ``sampled`` estimator.
        chunk_size: examples whose per-example weight gradients are formed at once (None: as many as keep the
            largest parameter's under 1 GiB).
        progress: show a progress bar.
        total: number of batches, for the progress bar.

    Returns:
        The sums (fp32, on the model's device) and the numbers of examples and target tokens.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums: dict[str, torch.Tensor] = {name: torch.zeros(p.shape, dtype=torch.float32, device=device)
                                     for name, p in params.items()}
    result = FisherSums(sums, estimator=estimator)
    for batch in tqdm(batches, total=total, desc=f"fisher ({estimator})", unit="batch", disable=not progress,
                      leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        nll = causal_lm_nll(model, batch, sampled=estimator == "sampled", generator=generator)
        squares = squared_gradient_sums(model, params, nll, per_example=estimator != "batch", chunk_size=chunk_size)
        for name, value in squares.items():
            sums[name] += value
        result.n_examples += nll.n_examples
        result.n_tokens += nll.n_tokens
    return result


def fisher_metadata(sums: FisherSums, *, model: str, data: str | None, **extra: object) -> dict[str, str]:
    """The string metadata a Fisher file carries (SPEC §1)."""
    metadata = {
        "format": FISHER_FORMAT,
        "estimator": sums.estimator,
        "biased": "true" if sums.estimator == "batch" else "false",
        "n_examples": str(sums.n_examples),
        "n_tokens": str(sums.n_tokens),
        "model": model,
        "fishmerge_version": __version__,
    }
    if data is not None:
        metadata["data"] = data
    metadata.update({k: str(v) for k, v in extra.items() if v is not None})
    return metadata


def save_fisher(folder: Path, fisher: Mapping[str, torch.Tensor], metadata: dict[str, str],
                *, max_shard_bytes: int = 5 * 10**9) -> list[Path]:
    """Write a Fisher like a checkpoint: fp32 safetensors keyed by parameter name, sharded when large."""
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in fisher.items()}
    return save_tensors(Path(folder), FISHER_STEM, tensors, max_shard_bytes=max_shard_bytes, metadata=metadata)
