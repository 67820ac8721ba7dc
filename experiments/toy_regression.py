"""Toy regression: FedAvg against FedFish on two clients with partially overlapping inputs.

The FedFish paper's motivating example (Dhawan et al., TMLR 2024, arXiv 2311.10291): two clients hold 1-D
regression data from different, partly overlapping input intervals of one nonlinear function; each trains a
small MLP from a shared initialization, and the server aggregates the two models. Averaging the parameters
(FedAvg) mixes two functions that were each only constrained on their own interval; weighting each parameter
by the client's Fisher (FedFish) keeps, for each parameter, the value of the client whose data depends on it.

Setup (ours; the paper's exact toy settings are not reproduced):

* target y = sin(2x) + 0.3 x + noise (σ = 0.05); client A draws x uniformly on [-3, o], client B on [-o, 3];
  o is swept from 0 (disjoint halves, touching at 0) to 3 (both on [-3, 3]).
* MLP 1 → 32 → 32 → 1 with tanh, the same seeded initialization for both clients; each client trains with
  full-batch Adam on its own data.
* Fisher: the likelihood is Gaussian, p(y | x) = N(f(x), 1). Its *true* Fisher is exact here without sampling:
  E_y[(f − y)² ∇f ∇fᵀ] = ∇f ∇fᵀ, so the diagonal is the per-example squared gradient of the network output
  f(x_k) itself (not of the loss). We get it from the project's exact per-example engine,
  ``fishmerge.fisher.persample.squared_gradient_sums`` with ``nll = Σ_k f(x_k)``, divided by n (SPEC §1).
* Aggregation: FedAvg = ``fishmerge.kernels.weighted_average`` of the client models; FedFish =
  ``fishmerge.kernels.fisher_merge`` with the same weights λ_i = n_i and damping δ (default 1e-6). With one
  round and server learning rate 1 this is exactly one FedFish / FedAvg round (SPEC §3).
* Two modes (``--rounds 1 10``): the one-shot merge of the paper's picture, and R = 10 rounds in which both
  clients restart from the aggregated model and train ``--steps / R`` steps each round (a small federated run
  with the same total local computation).

Run: ``python experiments/toy_regression.py --out DIR`` (about a minute or two on a CPU core). Writes ``DIR/toy_regression.json``
(per mode, overlap and seed: MSE of each model on each client's data and on the union, plus mean/std over seeds),
``DIR/toy_regression.png`` (the aggregated functions against each client's data, first seed) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fishmerge.fisher.persample import squared_gradient_sums
from fishmerge.kernels import fisher_merge, weighted_average

NOISE = 0.05
X_MIN, X_MAX = -3.0, 3.0


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x) + 0.3 * x


def make_mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))


def client_data(lo: float, hi: float, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = lo + (hi - lo) * torch.rand(n, 1, generator=generator)
    y = target(x) + NOISE * torch.randn(n, 1, generator=generator)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step()
    model.eval()


def true_fisher(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Diagonal true Fisher of N(f(x), 1): mean over examples of (∂f(x_k)/∂θ)², exact per example."""
    model.eval()
    params = dict(model.named_parameters())
    sums = squared_gradient_sums(model, params, lambda: model(x).sum(), per_example=True)
    return {name: s / len(x) for name, s in sums.items()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load(model: nn.Module, values: dict[str, torch.Tensor]) -> nn.Module:
    model.load_state_dict(values)
    return model.eval()


@torch.no_grad()
def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((model(x) - y) ** 2).mean())


def aggregate(states, fishers, weights, method: str, damping: float) -> dict[str, torch.Tensor]:
    names = states[0].keys()
    if method == "fedavg":
        return {k: weighted_average([s[k] for s in states], weights) for k in names}
    return {k: fisher_merge([s[k] for s in states], [f[k] for f in fishers], weights, damping) for k in names}


def run_one(overlap: float, seed: int, rounds: int, args) -> dict:
    """Train the two clients from one shared init, aggregate both ways; MSEs of every model on every data set."""
    gen = torch.Generator().manual_seed(1000 + seed)
    xa, ya = client_data(X_MIN, overlap, args.n, gen)
    xb, yb = client_data(-overlap, X_MAX, args.n, gen)
    data = {"A": (xa, ya), "B": (xb, yb), "union": (torch.cat([xa, xb]), torch.cat([ya, yb]))}
    init = state(make_mlp(args.hidden, seed))
    weights = [float(len(xa)), float(len(xb))]
    steps = max(1, args.steps // rounds)
    globals_ = {"fedavg": init, "fedfish": init}
    clients: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for method in ("fedavg", "fedfish"):
            if rounds == 1 and method == "fedfish":  # same init, same data, same seed: the same client models
                states = clients["fedavg"]
            else:
                states = []
                for x, y in (data["A"], data["B"]):
                    model = load(make_mlp(args.hidden, seed), globals_[method])
                    torch.manual_seed(seed)
                    train(model, x, y, steps, args.lr)
                    states.append(state(model))
            clients[method] = states
            fishers = [true_fisher(load(make_mlp(args.hidden, seed), s), x)
                       for s, (x, _) in zip(states, (data["A"], data["B"]))] if method == "fedfish" else None
            globals_[method] = aggregate(states, fishers, weights, method, args.damping)
    result: dict = {"rounds": rounds, "overlap": overlap, "seed": seed, "mse": {}}
    # The client models of the last FedAvg round (with one round: the clients both aggregators merge).
    models = {"client_A": clients["fedavg"][0], "client_B": clients["fedavg"][1],
              "fedavg": globals_["fedavg"], "fedfish": globals_["fedfish"]}
    probe = make_mlp(args.hidden, seed)
    for name, values in models.items():
        load(probe, values)
        result["mse"][name] = {split: mse(probe, *xy) for split, xy in data.items()}
    result["_curves"] = curves(models, args.hidden, seed)
    result["_data"] = {k: (v[0].squeeze(1).tolist(), v[1].squeeze(1).tolist()) for k, v in data.items() if k != "union"}
    return result


@torch.no_grad()
def curves(models: dict, hidden: int, seed: int) -> dict:
    grid = torch.linspace(X_MIN, X_MAX, 200).unsqueeze(1)
    probe = make_mlp(hidden, seed)
    out = {"x": grid.squeeze(1).tolist(), "target": target(grid).squeeze(1).tolist()}
    for name, values in models.items():
        out[name] = load(probe, values)(grid).squeeze(1).tolist()
    return out


def summarize(results: list[dict]) -> list[dict]:
    table = []
    for rounds, o in sorted({(r["rounds"], r["overlap"]) for r in results}):
        rows = [r for r in results if r["overlap"] == o and r["rounds"] == rounds]
        entry: dict = {"rounds": rounds, "overlap": o, "seeds": len(rows)}
        for name in ("client_A", "client_B", "fedavg", "fedfish"):
            for split in ("A", "B", "union"):
                values = [r["mse"][name][split] for r in rows]
                entry[f"{name}/{split}"] = {"mean": statistics.fmean(values),
                                            "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        diffs = [r["mse"]["fedfish"]["union"] - r["mse"]["fedavg"]["union"] for r in rows]
        entry["fedfish_minus_fedavg/union"] = {"mean": statistics.fmean(diffs), "min": min(diffs), "max": max(diffs)}
        table.append(entry)
    return table


def plot(results: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed0 = min(r["seed"] for r in results)
    modes = sorted({r["rounds"] for r in results})
    overlaps = sorted({r["overlap"] for r in results})
    fig, axes = plt.subplots(len(modes), len(overlaps), figsize=(2.6 * len(overlaps), 2.4 * len(modes)),
                             sharex=True, sharey=True, squeeze=False, constrained_layout=True)
    for row, rounds in zip(axes, modes):
        for axis, o in zip(row, overlaps):
            r = next(x for x in results if x["seed"] == seed0 and x["overlap"] == o and x["rounds"] == rounds)
            c = r["_curves"]
            axis.scatter(*r["_data"]["A"], s=3, color="tab:blue", alpha=0.35, label="client A data")
            axis.scatter(*r["_data"]["B"], s=3, color="tab:orange", alpha=0.35, label="client B data")
            axis.plot(c["x"], c["target"], color="black", lw=1, ls=":", label="target")
            axis.plot(c["x"], c["fedavg"], color="tab:red", lw=1.5, label="FedAvg")
            axis.plot(c["x"], c["fedfish"], color="tab:green", lw=1.5, label="FedFish")
            m = r["mse"]
            axis.set_title(f"{rounds} round{'s' if rounds > 1 else ''}, o={o:g}: MSE avg {m['fedavg']['union']:.2f}"
                           f" / fish {m['fedfish']['union']:.2f}", fontsize=7)
            axis.set_ylim(-3, 3)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=5, loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=65)
    plt.close(fig)
    return out


def markdown_table(table: list[dict]) -> str:
    lines = ["| rounds | overlap o | FedAvg MSE on A | FedAvg on B | FedFish on A | FedFish on B | FedFish − FedAvg (union), mean [min, max] |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        def cell(key: str) -> str:
            return f"{e[key]['mean']:.3f} ± {e[key]['std']:.3f}"
        d = e["fedfish_minus_fedavg/union"]
        lines.append(f"| {e['rounds']} | {e['overlap']:g} | {cell('fedavg/A')} | {cell('fedavg/B')} | {cell('fedfish/A')} | "
                     f"{cell('fedfish/B')} | {d['mean']:+.3f} [{d['min']:+.3f}, {d['max']:+.3f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.75, 1.5, 2.25, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=64, help="examples per client")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600, help="local Adam steps per client, over all rounds")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 10],
                        help="1 = one-shot merge; R > 1 = R rounds of steps/R local steps each")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--damping", type=float, default=1e-6)
    parser.add_argument("--quick", action="store_true", help="2 overlaps, 2 seeds, 100 steps (a smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.overlaps, args.seeds, args.steps, args.rounds = [0.0, 3.0], [0, 1], 100, [1, 2]
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = [run_one(o, s, r, args) for r in args.rounds for o in args.overlaps for s in args.seeds]
    table = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(results, args.out / "toy_regression.png")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {"settings": settings, "seconds": time.perf_counter() - started, "table": table,
               "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]}
    for r in summary["runs"]:
        for values in r["mse"].values():
            if not all(math.isfinite(v) for v in values.values()):
                raise SystemExit(f"non-finite MSE at overlap {r['overlap']} seed {r['seed']}")
    (args.out / "toy_regression.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown_table(table))
    print(f"\n{len(results)} runs in {summary['seconds']:.1f} s; figure {figure}")
    return args.out


if __name__ == "__main__":
    main()
