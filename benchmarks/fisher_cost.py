"""Fisher estimation cost: tokens/s of each estimator against a plain forward+backward of the same model and batch.

    python benchmarks/fisher_cost.py [--threads 2] [--dtypes float32,bfloat16] [--repeats 3]

The baseline is one training step's worth of autograd work on the same closure the estimators use (the causal-LM
negative log-likelihood summed over the batch, every parameter trainable, gradients dropped). Each estimator runs
through ``accumulate_fisher`` exactly as ``fishmerge estimate`` does. The ratio column is estimator tokens/s over
forward+backward tokens/s: 1.0 means the Fisher costs one training step.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, print_table, write_json  # noqa: E402

from fishmerge.fisher.accumulate import accumulate_fisher  # noqa: E402
from fishmerge.fisher.persample import causal_lm_nll  # noqa: E402

ESTIMATORS = ("empirical", "sampled", "batch")
MODELS: dict[str, dict[str, Any]] = {
    # The CPU size.
    "cpu-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=8000),
    # ~1.1B, Llama-3.2-1B-like proportions, for the GPU script.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # Smoke-test size for --tiny runs of the GPU script.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
}


def build_model(size: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[size], tie_word_embeddings=False, max_position_embeddings=4096)
    # Initialised on the device itself: a 1B model's random init on the host takes longer than the benchmark.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype).eval()


def make_batch(vocab: int, batch: int, length: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    # Ragged examples, as real data is: the last quarter of the rows lose up to half their tokens to padding.
    for row in range(batch - batch // 4, batch):
        mask[row, length // 2 + row % (length // 2):] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """The baseline: the estimators' own loss closure, one ordinary backward into every parameter."""
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    causal_lm_nll(model, batch)().backward()
    for p in model.parameters():
        p.grad = None


def estimate(model: torch.nn.Module, batch: dict[str, torch.Tensor], estimator: str,
             chunk_size: int | None) -> None:
    params = dict(model.named_parameters())
    accumulate_fisher(model, params, [batch], estimator=estimator, progress=False, chunk_size=chunk_size)


def timed_interleaved(fns: dict[str, Any], repeats: int, iters: int, sync) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds of ``iters`` calls each, after one warm-up call.

    The functions take turns within every round, so a burst of other work on a shared machine slows one round of
    all of them rather than all rounds of one: ratios taken within a round stay fair.
    """
    for fn in fns.values():
        fn()
    sync()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            out[name].append((time.perf_counter() - start) / iters)
    return out


def bench(size: str, dtype: torch.dtype, device: str, batch_size: int, length: int, repeats: int, iters: int,
          chunk_size: int | None, estimators: list[str]) -> list[dict[str, Any]]:
    model = build_model(size, dtype, device)
    batch = make_batch(MODELS[size]["vocab_size"], batch_size, length, device)
    tokens = batch_size * length  # padded positions are computed too, so they count as work
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fns = {"forward+backward": lambda: forward_backward(model, batch)}
    for estimator in estimators:
        fns[estimator] = lambda e=estimator: estimate(model, batch, e, chunk_size)
    times = timed_interleaved(fns, repeats, iters, sync)
    n_params = sum(p.numel() for p in model.parameters())
    base = times["forward+backward"]
    rows = []
    for name, runs in times.items():
        row = _row(size, n_params, dtype, batch_size, length, name, runs, tokens)
        # Median over rounds of the within-round ratio: robust to rounds slowed by other processes.
        row["ratio_vs_fwd_bwd"] = median([b / t for b, t in zip(base, runs)])
        rows.append(row)
    del model
    return rows


def _row(size: str, n_params: int, dtype: torch.dtype, batch: int, length: int, what: str, times: list[float],
         tokens: int) -> dict[str, Any]:
    return {"model": size, "params_M": round(n_params / 1e6, 1), "dtype": str(dtype).removeprefix("torch."),
            "batch": f"{batch}x{length}", "run": what, "s_per_batch": median(times),
            "tokens_per_s": tokens / median(times), "runs_s": [round(t, 4) for t in times]}


TARGETS = {"empirical": 0.5, "sampled": 0.5, "batch": 0.9}
COLUMNS = ["model", "params_M", "dtype", "batch", "run", "s_per_batch", "tokens_per_s", "ratio_vs_fwd_bwd", "target",
           "met"]


def annotate(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        target = TARGETS.get(row["run"])
        row["target"] = target
        row["met"] = None if target is None else ("yes" if row["ratio_vs_fwd_bwd"] >= target else "NO")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cpu-small", choices=sorted(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3, help="calls per timing")
    parser.add_argument("--chunk-size", type=int, default=None, help="accumulate_fisher's chunk_size")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/fisher_cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for name in args.dtypes.split(","):
        rows += bench(args.model, getattr(torch, name), args.device, args.batch_size, args.length, args.repeats,
                      args.iters, args.chunk_size, args.estimators.split(","))
    annotate(rows)
    print_table(rows, COLUMNS)
    write_json(args.json, {"benchmark": "fisher_cost", "machine": machine(), "threads": args.threads,
                           "device": args.device, "repeats": args.repeats, "iters": args.iters, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
