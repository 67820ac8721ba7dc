"""One FedFish / FedAvg round as small hooks: client update, aggregation sums, server step (SPEC §3).

Client i trains from θ_t to θ_i, estimates its Fisher F_i at θ_i on its own data, and contributes
a_i = n_i (F_i + δ) ⊙ Δ_i and b_i = n_i (F_i + δ), added up by :func:`fishmerge.kernels.add_fisher_terms`, which
is :func:`fishmerge.kernels.fisher_sums` — the kernel of `fishmerge merge` — for one client. FedAvg is the same with F_i ≡ 0 and δ = 1. The server divides the sums
(:func:`fishmerge.kernels.divide_sums`) and applies a server optimizer to the pseudo-gradient −Δ (FedOpt,
Reddi et al. 2021, "Adaptive Federated Optimization"). Nothing here knows about processes: the driver reduces
the sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fishmerge.federated.config import FederatedConfig, ServerSpec
from fishmerge.federated.data import subsample
from fishmerge.federated.models import load_state
from fishmerge.fisher.accumulate import accumulate_fisher
from fishmerge.kernels import add_fisher_terms, divide_sums
from fishmerge.textdata import batches
from fishmerge.training import EvalResult, evaluate, make_optimizer, train
from fishmerge.workspace import Workspace

State = dict[str, torch.Tensor]


class NonFiniteUpdate(ValueError):
    """A client's update or Fisher holds NaN or Inf (e.g. a too large client learning rate)."""


@dataclass
class ClientResult:
    """What one client sends (``delta``, ``fisher``) and reports (losses on its own data)."""

    client_id: str
    n_examples: int
    delta: State
    fisher: State | None
    train_loss: float
    local: EvalResult  # L_i(θ_i) on the client's training data, for the Client-Server Barrier


def client_update(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    global_state: State,
    sequences: list[list[int]],
    config: FederatedConfig,
    *,
    client_id: str,
    seed: int,
    pad_id: int,
    exclude_ids: tuple[int, ...] = (),
) -> ClientResult:
    """Train from the global model for ``local_epochs``, then (FedFish) estimate the Fisher at θ_i."""
    load_state(params, global_state)
    spec = config.client
    optimizer = make_optimizer(spec.optimizer, params.values(), lr=spec.lr, momentum=spec.momentum)
    train_loss = train(model, sequences, epochs=config.local_epochs, batch_size=spec.batch_size, pad_id=pad_id,
                       optimizer=optimizer, seed=seed)
    delta = {name: p.detach().float() - global_state[name] for name, p in params.items()}
    if not all(bool(torch.isfinite(d).all()) for d in delta.values()) or not math.isfinite(train_loss):
        raise NonFiniteUpdate(f"client {client_id}: the update is not finite (lower client.lr)")
    local = evaluate(model, batches(sequences, spec.batch_size, pad_id), exclude_ids=exclude_ids)
    fisher = None
    if config.aggregator == "fedfish":
        examples = fisher_examples(sequences, config.fisher.max_examples, seed)
        sums = accumulate_fisher(model, params, batches(examples, config.fisher.batch_size, pad_id),
                                 estimator=config.fisher.estimator, seed=seed, progress=False)
        fisher = sums.mean()
        if not all(bool(torch.isfinite(f).all()) for f in fisher.values()):
            raise NonFiniteUpdate(f"client {client_id}: the Fisher overflowed (lower client.lr)")
    return ClientResult(client_id, len(sequences), delta, fisher, train_loss, local)


def fisher_examples(sequences: list[list[int]], limit: int | None, seed: int) -> list[list[int]]:
    """The examples a client's Fisher is estimated on: all of them, or a seeded subsample of ``limit``.

    The Fisher is a mean over examples, so a subsample estimates the same quantity for less compute: the pass
    at θ_i costs about one local epoch over the examples it sees."""
    return subsample(sequences, limit, seed, round_index=0, client_index=0)  # `seed` is already per round and client


@dataclass
class RoundSums:
    """Σ a_i and Σ b_i of the clients seen so far (SPEC §3), plus the round's scalar statistics."""

    numerator: State = field(default_factory=dict)
    denominator: State = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=lambda: {"clients": 0.0, "examples": 0.0, "train_loss": 0.0})
    workspace: Workspace = field(default_factory=Workspace, repr=False)

    @classmethod
    def zeros(cls, state: State, fedfish: bool) -> RoundSums:
        """Zeros shaped like ``state``, so every process holds the same tensors for the all-reduce even when
        all its clients failed. FedAvg's denominator is a scalar: it uploads half FedFish's bytes."""
        sums = cls()
        for name, value in state.items():
            sums.numerator[name] = torch.zeros_like(value, dtype=torch.float32)
            sums.denominator[name] = torch.zeros_like(sums.numerator[name]) if fedfish else \
                torch.zeros((), dtype=torch.float32, device=value.device)
        return sums

    def add(self, result: ClientResult, damping: float) -> None:
        """Add one client's terms; FedAvg (no Fisher) uses δ = 1, i.e. weight n_i."""
        for name, delta in result.delta.items():
            fisher = result.fisher[name] if result.fisher is not None else None
            add_fisher_terms(self.numerator[name], self.denominator[name], delta, fisher, float(result.n_examples),
                             damping if fisher is not None else 1.0, self.workspace)
        self.stats["clients"] += 1
        self.stats["examples"] += result.n_examples
        self.stats["train_loss"] += result.train_loss

    def update(self) -> State:
        """Δ = Σ a_i / Σ b_i; coordinates with no information from any client do not move."""
        return {name: divide_sums(self.numerator[name], self.denominator[name]) for name in self.numerator}


class ServerOptimizer:
    """Applies a torch optimizer to fp32 master copies of the global parameters, with gradient −Δ."""

    def __init__(self, state: State, spec: ServerSpec):
        self.params = {name: torch.nn.Parameter(t.detach().float().clone()) for name, t in state.items()}
        values = list(self.params.values())
        if spec.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(values, lr=spec.lr, momentum=spec.momentum)
        else:
            self.optimizer = torch.optim.Adam(values, lr=spec.lr, betas=spec.betas, eps=spec.eps)

    def step(self, delta: State) -> State:
        for name, p in self.params.items():
            p.grad = -delta[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.state()

    def state(self) -> State:
        return {name: p.detach() for name, p in self.params.items()}

    def load(self, state: State, optimizer_state: dict) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])
        self.optimizer.load_state_dict(optimizer_state)
