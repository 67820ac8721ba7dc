"""Builders of tiny checkpoints, Fishers and datasets on disk for the integration tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import tiny_llama
from fishmerge.fisher.accumulate import FisherSums, fisher_metadata, save_fisher

WORDS = "the a model data merge fisher weight layer token train test loss value python code query table".split()


def word_tokenizer():
    from fishmerge.data.tokenizer import build_word_level_tokenizer

    return build_word_level_tokenizer(WORDS, max_words=30)


def save_model(folder: Path, seed: int, *, shard: str | None = None, tokenizer: bool = True, **overrides) -> Path:
    """A tiny Llama over the test vocabulary, saved with save_pretrained."""
    tok = word_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=seed, **overrides)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        tok.save_pretrained(folder)
    return Path(folder)


def save_adapter(folder: Path, base: Path, seed: int) -> Path:
    """A LoRA adapter on ``base`` with non-zero A and B, saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return Path(folder)


def save_random_fisher(folder: Path, model: Path, seed: int, n_examples: int = 10, stem: str = "model",
                       skip: tuple[str, ...] = ()) -> Path:
    """A Fisher with positive random values over every float tensor of ``model`` (not from an estimator)."""
    from safetensors import safe_open

    filename = f"{stem}.safetensors"
    g = torch.Generator().manual_seed(seed)
    with safe_open(Path(model) / filename, "pt") as f:
        fisher = {k: torch.rand(f.get_slice(k).get_shape(), generator=g) for k in f.keys() if k not in skip}
    sums = FisherSums(fisher, n_examples=n_examples, n_tokens=5 * n_examples, estimator="empirical")
    save_fisher(folder, fisher, fisher_metadata(sums, model=str(model), data="synthetic"))
    return Path(folder)


def load_state(folder: Path, stem: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, in memory: the slow reference path."""
    from safetensors.torch import load_file

    index = Path(folder) / f"{stem}.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [f"{stem}.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(Path(folder) / name))
    return state


def fails_with_one_line(capsys, argv, *needles) -> str:
    """Run the CLI on ``argv``: a non-zero exit and exactly one error line (progress bars aside) naming ``needles``."""
    from fishmerge.cli.main import main

    code = main([str(x) for x in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code != 0
    assert len(err) == 1 and err[0].startswith("fishmerge "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]
