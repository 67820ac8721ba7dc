"""Load a checkpoint folder as a model for estimation or training: transformers models and PEFT adapters.

Loading is where code from a checkpoint could run: models whose config maps to custom code (``auto_map``) need
``trust_remote_code``, which is refused unless the caller opts in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fishmerge.checkpoint import Checkpoint, open_checkpoint
from fishmerge.errors import CheckpointError, one_line

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to run, with the tokenizer saved beside it and the folder it came from."""

    model: torch.nn.Module
    tokenizer: object
    checkpoint: Checkpoint

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters that training changes and a Fisher covers (for an adapter: the adapter's)."""
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}


def load_model(
    path: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM or a PEFT adapter (on its base model) from a local folder, in eval mode."""
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    if checkpoint.kind == "adapter":
        model = _load_adapter(checkpoint, dtype, trust_remote_code, allow_pickle)
        tokenizer_source = checkpoint.path if _has_tokenizer(checkpoint.path) else checkpoint.base_model
    else:
        _check_remote_code(checkpoint.path, checkpoint.config, trust_remote_code)
        model = _from_pretrained(checkpoint.path, dtype, trust_remote_code, allow_pickle)
        tokenizer_source = checkpoint.path
    tokenizer = _load_tokenizer(tokenizer_source, checkpoint.path, trust_remote_code)
    return LoadedModel(model.to(device).eval(), tokenizer, checkpoint)


def _check_remote_code(path: Path | str, config: dict, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise CheckpointError(
            f"{path} needs custom code from its repository (config.json has auto_map): read that code, and pass "
            "--trust-remote-code only if you trust it"
        )


def _from_pretrained(source: Path | str, dtype, trust_remote_code: bool, allow_pickle: bool):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype or "auto", trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle
        )
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"cannot load {source} as a causal language model: {one_line(err)}") from err


def _load_adapter(checkpoint: Checkpoint, dtype, trust_remote_code: bool, allow_pickle: bool):
    from peft import PeftModel

    base = checkpoint.base_model
    if not base:
        raise CheckpointError(f"{checkpoint.path}/adapter_config.json names no base_model_name_or_path: add it")
    if Path(base).is_dir():
        _check_remote_code(base, open_checkpoint(Path(base), allow_pickle=allow_pickle).config, trust_remote_code)
    model = _from_pretrained(base, dtype, trust_remote_code, allow_pickle)
    try:
        return PeftModel.from_pretrained(model, checkpoint.path, is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"cannot load adapter {checkpoint.path} on {base}: {one_line(err)}") from err


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def _load_tokenizer(source: Path | str | None, folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(
            f"no usable tokenizer for {folder}: save one beside the weights with tokenizer.save_pretrained ({one_line(err)})"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of every loss, so any id will do
    return tokenizer


def build_small_llama(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, seed: int = 0,
                      tokenizer=None, heads: int = 4, intermediate_size: int | None = None, max_positions: int = 64):
    """A small Llama built from a config (no download), with the tokenizer's special ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=getattr(tokenizer, "pad_token_id", 0),
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
