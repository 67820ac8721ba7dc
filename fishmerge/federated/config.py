"""The run config of `fishmerge federate`: strict, validated once, written next to the results."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from fishmerge.config import StrictModel, parse_config
from fishmerge.errors import ConfigError


class SmallModel(StrictModel):
    """A fresh Llama-style transformer built from a config (no download)."""

    hidden_size: int = Field(96, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int | None = Field(None, ge=8, description="default: 2 × hidden_size")
    max_positions: int = Field(64, ge=8)


class Pretrain(StrictModel):
    """Central pretraining of the fresh model on the generator's general text, cached by its settings."""

    sentences: int = Field(6000, ge=1)
    epochs: int = Field(2, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class ModelSpec(StrictModel):
    """Where the initial global model comes from: a checkpoint folder, or a fresh small transformer."""

    path: Path | None = Field(None, description="transformers checkpoint folder (with its tokenizer)")
    new: SmallModel | None = None
    pretrain: Pretrain | None = Field(default_factory=Pretrain)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.new is None):
            raise ValueError("give exactly one of model.path (a checkpoint) or model.new (a fresh small model)")
        return self


class DataSpec(StrictModel):
    """Per-user clients (SPEC §5)."""

    source: Literal["synthetic", "stackoverflow", "posts_xml", "dataset"] = "synthetic"
    path: Path | None = Field(None, description="stackoverflow.sqlite, Posts.xml, or a datasets folder/file")
    vocab_size: int = Field(10_000, ge=1, description="word-level task: most frequent train words kept")
    max_words: int = Field(20, ge=1, description="word-level task: words kept per sentence")
    max_examples_per_client: int | None = Field(64, ge=1, description="seeded subsample of each client's data")
    min_examples: int = Field(5, ge=1, description="clients with fewer examples are left out")
    eval_clients: int = Field(20, ge=1, description="held-out clients for evaluation and personalization")
    user_column: str = "user_id"
    text_column: str = "text"
    max_length: int = Field(64, ge=2, description="subword tokens per example for source: dataset")
    train_users: int = Field(200, ge=1, description="synthetic: train users")
    heldout_users: int = Field(40, ge=0, description="synthetic: heldout users")
    test_users: int = Field(40, ge=0, description="synthetic: test users")
    seed: int = Field(0, ge=0, description="seed of the data itself (generator, splits); runs of any seed share it")

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source != "synthetic" and self.path is None:
            raise ValueError(f"data.source {self.source} needs data.path")
        return self


class ClientSpec(StrictModel):
    """Local training on each client."""

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(16, ge=1)


class FisherSpec(StrictModel):
    """How FedFish clients estimate their Fisher (SPEC §1, §3)."""

    estimator: Literal["empirical", "sampled", "batch"] = "empirical"
    damping: float = Field(1e-6, gt=0, description="δ > 0: coordinates no client informs get the FedAvg update")
    batch_size: int = Field(32, ge=1)
    max_examples: int | None = Field(
        None, ge=1, description="estimate each client's Fisher on a seeded subsample of at most this many of its "
        "examples (default: all of them); the aggregation weight n_i still counts them all")


class ServerSpec(StrictModel):
    """Server optimizer on the pseudo-gradient −Δ (FedOpt, Reddi et al. 2021)."""

    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-3, gt=0)


class EvalSpec(StrictModel):
    """When and on what the global model is evaluated."""

    every: int = Field(1, ge=1, description="evaluate on held-out clients every N rounds (and after the last)")
    split: Literal["heldout", "test"] = "heldout"


class PersonalizationSpec(StrictModel):
    """Personalization evaluation (SPEC §4)."""

    enabled: bool = True
    split: Literal["heldout", "test"] = "test"
    fraction: float = Field(0.8, gt=0, lt=1, description="first part of each client's examples used to fine-tune")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, description="fine-tuning learning rate (default: client.lr)")


class LoraSpec(StrictModel):
    """Train, estimate and aggregate LoRA adapter parameters only."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "v_proj"]


class FederatedConfig(StrictModel):
    """Everything a federated run needs; the defaults are the embedded offline run."""

    model: ModelSpec = Field(default_factory=lambda: ModelSpec(new=SmallModel()))
    data: DataSpec = Field(default_factory=DataSpec)
    rounds: int = Field(10, ge=1)
    clients_per_round: int = Field(10, ge=1)
    local_epochs: int = Field(1, ge=1)
    client: ClientSpec = Field(default_factory=ClientSpec)
    aggregator: Literal["fedfish", "fedavg"] = "fedfish"
    fisher: FisherSpec = Field(default_factory=FisherSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    personalization: PersonalizationSpec = Field(default_factory=PersonalizationSpec)
    lora: LoraSpec | None = None
    seed: int = Field(0, ge=0)
    output_dir: Path = Path("runs/fedfish")
    keep_checkpoints: int = Field(2, ge=1, description="round checkpoints kept besides the final model")
    save_client_updates: bool = Field(False, description="write each client's model and Fisher (for inspection)")
    cache_dir: Path | None = Field(None, description="synthetic data and pretrained model cache (default: ~/.cache/fishmerge)")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_run_config(path: Path | None = None, **overrides: object) -> FederatedConfig:
    """The run config in ``path`` (or the embedded defaults), with the ``overrides`` that are not None on top."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: check the path")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
    data |= {key: value for key, value in overrides.items() if value is not None}
    return parse_config(FederatedConfig, data, str(path or "command line"))
