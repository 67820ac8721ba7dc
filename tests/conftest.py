"""Shared test set-up: offline Hub, one torch thread, tiny models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stackexchange"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def stackexchange_dir() -> Path:
    """The shared Stack Exchange samples; tests that need them skip in a clone without ../shared."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"Stack Exchange samples not found at {SHARED_DATA} (they live in ../shared beside the repo)")
    return SHARED_DATA


def tiny_llama(vocab_size: int = 64, seed: int = 0, **overrides):
    """A 2-layer Llama small enough for exact per-example checks on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlamaConfig(**(settings | overrides))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
