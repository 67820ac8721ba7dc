"""The initial global model: a checkpoint, or a small Llama pretrained centrally and cached.

Federated training of a small model from random weights spends many rounds predicting only frequent and OOV
tokens, which makes every comparison meaningless; the embedded default therefore starts from a model
pretrained on the synthetic generator's general text, built once and cached under a key of its settings.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from fishmerge.data.synthetic import general_sentences
from fishmerge.federated.config import FederatedConfig, LoraSpec
from fishmerge.data.tokenizer import word_sequences
from fishmerge.federated.data import is_word_level
from fishmerge.modeling import build_small_llama
from fishmerge.training import make_optimizer, train
from fishmerge.writer import atomic_output_dir

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "fishmerge"


def pretrained_folder(config: FederatedConfig, tokenizer, cache_dir: Path) -> Path:
    """A checkpoint folder for the initial model: ``model.path``, or the cached pretrained small Llama."""
    if config.model.path is not None:
        return Path(config.model.path)
    words = tokenizer.get_vocab()
    key = hashlib.sha256(
        repr((config.model.new.model_dump(), config.model.pretrain and config.model.pretrain.model_dump(),
              sorted(words.items()), config.data.seed, config.data.max_words)).encode()
    ).hexdigest()[:12]
    folder = cache_dir / f"pretrained-{key}"
    if not (folder / "config.json").exists():
        build_pretrained(config, tokenizer, folder)
    return folder


def build_pretrained(config: FederatedConfig, tokenizer, folder: Path) -> Path:
    """Build the fresh small model of ``config.model.new``, pretrain it centrally, save it with its tokenizer."""
    spec = config.model.new
    assert spec is not None
    model = build_small_llama(len(tokenizer), hidden_size=spec.hidden_size, layers=spec.layers, seed=config.data.seed,
                              tokenizer=tokenizer, heads=spec.heads, intermediate_size=spec.intermediate_size,
                              max_positions=spec.max_positions)
    pretrain = config.model.pretrain
    if pretrain is not None:
        sentences = general_sentences(pretrain.sentences, config.data.seed + 1)
        sequences = word_sequences(tokenizer, sentences, config.data.max_words) if is_word_level(tokenizer) else \
            tokenizer(sentences)["input_ids"]
        logger.info("pretraining a small Llama on %d general sentences (cached in %s)", len(sequences), folder)
        train(model, sequences, epochs=pretrain.epochs, batch_size=pretrain.batch_size, pad_id=tokenizer.pad_token_id,
              optimizer=make_optimizer("adamw", model.parameters(), lr=pretrain.lr), seed=config.data.seed)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def load_global_model(folder: Path, dtype: str, lora: LoraSpec | None, device) -> torch.nn.Module:
    """The global model on ``device``: the checkpoint, wrapped with a fresh LoRA adapter when asked."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules)))
    return model.to(device).eval()


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What clients train and the server aggregates: every parameter, or the adapter's with LoRA."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's parameters in place (casting to their dtype)."""
    for name, p in params.items():
        p.copy_(state[name])
