"""How far each aggregator moved the global model: ||θ_final − θ_0|| of finished local-epochs runs, by part.

Reads ``OUT/runs/<name>/final`` of ``experiments/local_epochs.py`` and the pretrained starting model of each
data set (``OUT/cache/pretrained-*``, found through the run's own config), and reports the L2 norm of the total
change of the input embeddings, the output head and everything else, for FedAvg and FedFish at each (data,
E, lr), mean over seeds. FedFish's per-coordinate weighting lets a coordinate that one client's Fisher dominates
take that client's update whole, where FedAvg divides it by the number of clients; this measures how much
larger FedFish's steps are and where.

Run: ``python experiments/update_norms.py --out DIR`` (DIR of the sweep); writes ``DIR/update_norms.json`` and
``DIR/update_norms.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights |= {k: v.float() for k, v in load_file(file).items()}
    return weights


def part(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if "lm_head" in name:
        return "head"
    return "rest"


def starting_model(run: Path) -> Path:
    """The pretrained folder the run started from (same cache key as the driver)."""
    import yaml

    from fishmerge.federated.config import FederatedConfig
    from fishmerge.federated.data import load_federated_data
    from fishmerge.federated.models import pretrained_folder

    config = FederatedConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    tokenizer = load_federated_data(config.data, Path(config.cache_dir)).tokenizer
    return pretrained_folder(config, tokenizer, Path(config.cache_dir))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the --out folder of local_epochs.py")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args(argv)
    starts: dict[str, dict[str, torch.Tensor]] = {}
    norms: dict[tuple, list[dict]] = {}
    for run in sorted((args.out / "runs").iterdir()):
        dataset, variant, e, lr, seed = run.name.split("-")
        epochs = int(e[1:])
        if variant not in ("fedavg", "fedfish") or epochs not in args.epochs or not (run / "final").is_dir():
            continue
        if dataset not in starts:
            starts[dataset] = load_weights(starting_model(run))
        final = load_weights(run / "final")
        sums = {"embeddings": 0.0, "head": 0.0, "rest": 0.0}
        for name, value in final.items():
            sums[part(name)] += float(((value - starts[dataset][name]) ** 2).sum())
        norms.setdefault((dataset, variant, epochs, float(lr[2:])), []).append({k: v ** 0.5 for k, v in sums.items()})
    rows = []
    for (dataset, variant, epochs, lr), values in sorted(norms.items()):
        rows.append({"data": dataset, "aggregator": variant, "epochs": epochs, "lr": lr, "seeds": len(values),
                     **{k: statistics.fmean(v[k] for v in values) for k in ("embeddings", "head", "rest")}})
    lines = ["| data | lr | E | aggregator | ‖Δ‖ embeddings | ‖Δ‖ head | ‖Δ‖ rest |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["data"], r["lr"], r["epochs"], r["aggregator"])):
        lines.append(f"| {r['data']} | {r['lr']:g} | {r['epochs']} | {r['aggregator']} | {r['embeddings']:.3f} | "
                     f"{r['head']:.3f} | {r['rest']:.3f} |")
    table = "\n".join(lines)
    (args.out / "update_norms.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "update_norms.md").write_text(table + "\n\nL2 norm of θ_final − θ_0 after 6 rounds, mean over seeds.\n")
    print(table)
    return {"rows": rows}


if __name__ == "__main__":
    main()
