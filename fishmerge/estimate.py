"""`fishmerge estimate`: the diagonal Fisher of a checkpoint on a dataset, saved beside no input.

This is a driver: it is the one place of the estimate path that knows about processes. Under
``accelerate launch`` every process takes a contiguous share of the examples, the per-process sums and counts
are added with an all-reduce, and the main process writes the result — the same Fisher as one process on the
same data (for ``empirical``; the draws of ``sampled`` and the batches of ``batch`` depend on the split).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fishmerge.errors import CheckpointError
from fishmerge.fisher.accumulate import FisherSums, accumulate_fisher, fisher_metadata, save_fisher
from fishmerge.modeling import LoadedModel, load_model
from fishmerge.textdata import batches, load_texts, tokenize
from fishmerge.writer import atomic_output_dir, check_output_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EstimateOptions:
    """How to estimate (the flags of `fishmerge estimate`)."""

    estimator: str = "empirical"
    max_examples: int | None = None
    batch_size: int = 8
    max_length: int = 512
    text_column: str | None = None
    device: str = "auto"
    seed: int = 0
    chunk_size: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    overwrite: bool = False


def estimate_fisher(model_dir: Path, data: Path, out: Path, options: EstimateOptions = EstimateOptions()) -> Path:
    """Estimate the diagonal Fisher of ``model_dir`` on ``data`` and write it to ``out`` (SPEC §1)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=_wants_cpu(options.device))
    out = check_output_path(out, [Path(model_dir), Path(data)], overwrite=options.overwrite)
    loaded = load_model(Path(model_dir), device=accelerator.device, trust_remote_code=options.trust_remote_code,
                        allow_pickle=options.allow_pickle)
    texts = load_texts(data, text_column=options.text_column, max_examples=options.max_examples)
    sequences = tokenize(texts, loaded.tokenizer, options.max_length)
    params = loaded.trainable_parameters()
    with accelerator.split_between_processes(sequences) as mine:
        sums = accumulate_fisher(
            loaded.model,
            params,
            batches(mine, options.batch_size, loaded.tokenizer.pad_token_id),
            estimator=options.estimator,  # type: ignore[arg-type]
            seed=options.seed + accelerator.process_index,
            chunk_size=options.chunk_size,
            progress=accelerator.is_local_main_process,
            total=-(-len(mine) // options.batch_size),
        )
    sums = _reduce(accelerator, sums)
    if accelerator.is_main_process:
        fisher = checkpoint_keys(loaded, sums.mean())
        metadata = fisher_metadata(sums, model=str(model_dir), data=str(data), max_length=options.max_length,
                                   batch_size=options.batch_size, seed=options.seed,
                                   processes=accelerator.num_processes)
        with atomic_output_dir(out, overwrite=options.overwrite) as tmp:
            save_fisher(tmp, fisher, metadata)
        logger.info("Fisher of %s on %d examples (%d tokens) written to %s", model_dir, sums.n_examples,
                    sums.n_tokens, out)
    accelerator.wait_for_everyone()
    return out


def _wants_cpu(device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        from fishmerge.errors import ConfigError

        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or auto")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def _reduce(accelerator, sums: FisherSums) -> FisherSums:
    if accelerator.num_processes == 1:
        return sums
    counts = torch.tensor([sums.n_examples, sums.n_tokens], dtype=torch.float64, device=accelerator.device)
    counts = accelerator.reduce(counts, reduction="sum")
    reduced = {name: accelerator.reduce(t, reduction="sum") for name, t in sums.sums.items()}
    return FisherSums(reduced, int(counts[0]), int(counts[1]), sums.estimator)


def parameter_keys(model: torch.nn.Module, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename parameter names to the keys ``save_pretrained`` writes (PEFT drops the adapter name)."""
    from peft import PeftModel, get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=fisher) if isinstance(model, PeftModel) else fisher


def checkpoint_keys(loaded: LoadedModel, fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename parameter names to the keys the checkpoint file uses, so a merge can pair them up."""
    fisher = parameter_keys(loaded.model, fisher)
    stored = set(loaded.checkpoint.store.names())
    unknown = [name for name in fisher if name not in stored]
    if unknown:
        raise CheckpointError(
            f"parameter names of the loaded model differ from the keys in {loaded.checkpoint.path} (e.g. "
            f"{unknown[0]}): re-save the checkpoint with save_pretrained from the installed transformers/peft"
        )
    return fisher
