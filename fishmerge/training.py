"""Plain causal-LM training and evaluation loops, shared by the demo, the federated clients and personalization.

Metrics follow SPEC §4: token-level cross-entropy and next-token accuracy over target tokens (padding
excluded) and, for the word-level Stack Overflow task, accuracy without PAD, OOV and EOS targets (TFF's
``accuracy_without_out_of_vocab_or_end_of_sentence``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fishmerge.textdata import batches as make_batches

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class EvalResult:
    """Mean token cross-entropy and accuracies over the target tokens of a dataset.

    ``accuracy_no_oov_eos`` leaves the excluded target ids out (PAD, OOV and EOS for the word-level task:
    TFF's ``accuracy_without_out_of_vocab_or_end_of_sentence``); it is None when nothing is excluded.
    """

    loss: float
    accuracy: float
    n_tokens: int
    accuracy_no_oov_eos: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))

    def as_dict(self, prefix: str = "") -> dict[str, float | int | None]:
        values = asdict(self) | {"perplexity": self.perplexity}
        return {f"{prefix}{k}": v for k, v in values.items() if v is not None}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[Batch], *, exclude_ids: Sequence[int] = ()) -> EvalResult:
    """Evaluate a causal LM on ``batches`` (labels -100 where not a target).

    Args:
        model: the model, put in eval mode.
        batches: padded batches with ``input_ids``, ``attention_mask``, ``labels``.
        exclude_ids: target ids left out of the second accuracy (PAD, OOV, EOS for the word-level task).
    """
    model.eval()
    device = next(model.parameters()).device
    total_loss, tokens, correct, kept, kept_correct = 0.0, 0, 0, 0, 0
    excluded = torch.tensor(list(exclude_ids), dtype=torch.long, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        flat_logits, flat_targets = logits[mask].float(), targets[mask]
        total_loss += float(F.cross_entropy(flat_logits, flat_targets, reduction="sum"))
        hits = flat_logits.argmax(-1) == flat_targets
        tokens += int(mask.sum())
        correct += int(hits.sum())
        if len(excluded):
            keep = ~torch.isin(flat_targets, excluded)
            kept += int(keep.sum())
            kept_correct += int((hits & keep).sum())
    if tokens == 0:
        raise ValueError("no target tokens to evaluate on")
    without = (kept_correct / kept if kept else 0.0) if len(excluded) else None
    return EvalResult(total_loss / tokens, correct / tokens, tokens, without)


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd`` (with optional momentum), ``adam`` or ``adamw``."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: use sgd, adam or adamw")


def train(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    epochs: int,
    batch_size: int,
    pad_id: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
    max_steps: int | None = None,
    on_step: Callable[[float], None] | None = None,
) -> float:
    """Train on ``sequences`` for ``epochs`` passes in a seeded order; return the mean training loss.

    ``max_steps`` stops early (personalization by steps). Dropout is on while training.
    """
    model.train()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(sequences), generator=generator).tolist()
        for batch in make_batches([sequences[i] for i in order], batch_size, pad_id):
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(losses[-1])
            if max_steps is not None and len(losses) >= max_steps:
                model.eval()
                return sum(losses) / len(losses)
    model.eval()
    return sum(losses) / max(1, len(losses))
