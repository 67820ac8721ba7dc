"""Strict, validated configuration at the boundary: recipes and run configs are pydantic models.

Unknown keys are rejected with their path (``models.1.fishr``), values are checked once here, and every
error becomes one :class:`~fishmerge.errors.ConfigError` line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fishmerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

DType = Literal["float32", "bfloat16", "float16"]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are frozen after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(StrictModel):
    """One input of a merge."""

    model: Path = Field(description="checkpoint folder: a transformers model or a PEFT adapter")
    fisher: Path | None = Field(None, description="its Fisher folder, written by `fishmerge estimate`")
    weight: float | None = Field(None, ge=0, description="λ_i; default from `weights`")


class MergeRecipe(StrictModel):
    """A merge recipe (SPEC §2), as written in YAML."""

    method: str = "fisher"
    models: list[ModelEntry] = Field(min_length=1)
    damping: float = Field(1e-8, ge=0, description="δ, added to every Fisher")
    normalize: bool = Field(False, description="scale each Fisher to unit L2 norm first (Matena & Raffel)")
    weights: Literal["n_examples", "uniform"] | None = Field(
        None, description="λ_i of models without `weight`: n_examples of their Fisher (default with Fishers) or 1"
    )
    dtype: DType | None = Field(None, description="output dtype of floating tensors; null keeps the inputs'")
    max_shard_size: int | str = "5GB"
    base: Path | None = Field(None, description="folder whose config and tokenizer files are copied (default: first model)")
    allow_pickle: bool = Field(False, description="read pickled .bin weights (can run code: only for trusted files)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from fishmerge.methods import get_method

        get_method(name)
        return name

    def to_yaml(self) -> str:
        """The recipe as YAML, paths as strings, defaults included: the exact recipe that ran."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def parse_config(cls: type[M], data: Any, source: str = "config") -> M:
    """Validate ``data`` (a mapping) into ``cls``, turning pydantic's report into one line."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_errors(err)}") from None


def load_yaml_config(cls: type[M], path: Path) -> M:
    """Read a YAML file and validate it into ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    return parse_config(cls, data, source=str(path))


def describe_errors(err: ValidationError) -> str:
    """``models.1.fishr: unknown key; damping: must be >= 0`` — every problem, with its path, on one line."""
    parts = []
    for error in err.errors():
        path = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            parts.append(f"{path}: unknown key (remove it or fix its spelling)")
        elif error["type"] == "missing":
            parts.append(f"{path}: required key is missing")
        else:
            parts.append(f"{path}: {error['msg']}")
    return "; ".join(parts)
