"""Personalization evaluation (SPEC §4): how much a global model gains from a little local fine-tuning.

For each evaluation client, its examples (in chronological order) are split into a personalization part
(the first ``fraction``) and an evaluation part (the rest). The global model is evaluated on the evaluation
part (pre), a copy is fine-tuned on the personalization part with the client optimizer, and evaluated again
(post); the optimizer is the client's, at ``personalization.lr`` if set. The summary reports mean, median and quartiles across clients of pre, post and post − pre.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from fishmerge.federated.config import FederatedConfig
from fishmerge.federated.models import load_state
from fishmerge.textdata import batches
from fishmerge.training import evaluate, make_optimizer, train

METRICS = ("loss", "accuracy", "accuracy_no_oov_eos")


def personalize_client(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    global_state: dict[str, torch.Tensor],
    sequences: Sequence[Sequence[int]],
    config: FederatedConfig,
    *,
    client_id: str,
    seed: int,
    pad_id: int,
    exclude_ids: tuple[int, ...] = (),
) -> dict | None:
    """Pre and post metrics of one client, or None if it has too few examples to split."""
    cut = int(len(sequences) * config.personalization.fraction)
    tune, held = list(sequences[:cut]), list(sequences[cut:])
    if not tune or not held:
        return None
    load_state(params, global_state)
    spec = config.client
    pre = evaluate(model, batches(held, spec.batch_size, pad_id), exclude_ids=exclude_ids)
    lr = config.personalization.lr or spec.lr
    optimizer = make_optimizer(spec.optimizer, params.values(), lr=lr, momentum=spec.momentum)
    train(model, tune, epochs=config.personalization.epochs, batch_size=spec.batch_size, pad_id=pad_id,
          optimizer=optimizer, seed=seed, max_steps=config.personalization.max_steps)
    post = evaluate(model, batches(held, spec.batch_size, pad_id), exclude_ids=exclude_ids)
    load_state(params, global_state)
    row: dict = {"client": client_id, "n_personalize": len(tune), "n_eval": len(held)}
    for metric in METRICS:
        before, after = getattr(pre, metric), getattr(post, metric)
        if before is not None:
            row |= {f"pre_{metric}": before, f"post_{metric}": after, f"delta_{metric}": after - before}
    return row


def summarize(rows: Sequence[dict]) -> dict:
    """Mean, median and quartiles across clients of every pre/post/delta metric."""
    summary: dict = {"clients": len(rows)}
    if not rows:
        return summary
    for key in rows[0]:
        if key.split("_")[0] in ("pre", "post", "delta"):
            values = sorted(float(r[key]) for r in rows)
            q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
            summary[key] = {"mean": statistics.fmean(values), "median": median, "q1": q1, "q3": q3}
    return summary
