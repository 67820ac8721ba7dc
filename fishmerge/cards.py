"""Model cards for merged and federated checkpoints, rendered from the Jinja templates in ``hub_cards/``.

The metadata goes through :class:`huggingface_hub.ModelCardData`, so the YAML header is exactly what the Hub
parses; the templates only lay out the body. Python prepares plain rows (strings already escaped for Markdown
tables) and the templates place them. Rendering never touches the network and holds no dates or absolute
machine state beyond the inputs given, so the same inputs always give the same bytes (golden-file tests rely on
it).

Validation (:func:`validate_card`) is done offline on purpose: ``ModelCard.validate`` posts the card to the Hub.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from fishmerge.citations import FEDAVG_BIBTEX, FEDFISH_BIBTEX, FISHER_MERGING_BIBTEX
from fishmerge.errors import ConfigError

logger = logging.getLogger(__name__)

HUB_URL = "https://huggingface.co"
MERGE_TEMPLATE = "merge.md.j2"
FEDERATED_TEMPLATE = "federated.md.j2"

# License identifiers the Hub accepts in the `license` field (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset(
    """
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c
    ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib
    pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1 llama3.2
    llama3.3 llama4 gemma unknown other
    """.split()
)

BASE_MODEL_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})
LIBRARIES = frozenset({"transformers", "peft"})

_METHOD_TAGS = {"fisher": "fisher-merging", "average": "model-averaging"}
_AGGREGATOR_TAGS = {"fedfish": "fedfish", "fedavg": "fedavg"}
_AGGREGATOR_NAMES = {"fedfish": "FedFish", "fedavg": "FedAvg"}
_AGGREGATOR_DESCRIPTIONS = {
    "fedfish": (
        "FedFish: the server combines the client updates with per-parameter weights n_i (F_i + δ), where F_i is "
        "the diagonal Fisher information of client i's model on its own training data, so each parameter moves "
        "towards the clients whose data depend on it most."
    ),
    "fedavg": "FedAvg: the server averages the client updates weighted by each client's number of examples n_i.",
}
_CITATION_KEY = re.compile(r"@\w+\s*\{\s*([^,\s]+)\s*,")
_TABLE_ROWS = 10  # results table: the last evaluation rounds, enough to see the trend without drowning the card
_PREFERRED_METRICS = (
    "round", "train_loss", "eval_loss", "eval_accuracy", "eval_perplexity", "csb_loss", "csb_accuracy"
)


@dataclass(frozen=True)
class FisherProvenance:
    """Where a Fisher came from, as written in its safetensors metadata.

    Attributes:
        path: The Fisher folder.
        estimator: ``empirical``, ``sampled`` or ``batch``.
        n_examples: Number of examples the Fisher was averaged over.
        n_tokens: Number of target tokens those examples held.
        data: The data it was estimated on, if recorded.
        model: The checkpoint it was estimated at, if recorded.
        biased: True for the fast ``batch`` estimator, which squares batch-mean gradients.
    """

    path: str
    estimator: str
    n_examples: int
    n_tokens: int
    data: str | None
    model: str | None
    biased: bool

    @classmethod
    def from_metadata(cls, path: str | Path, metadata: Mapping[str, str]) -> FisherProvenance:
        """Build the provenance from the string metadata of a Fisher's safetensors file.

        Args:
            path: The Fisher folder.
            metadata: The ``__metadata__`` mapping of its (first) safetensors file.

        Raises:
            ConfigError: A count is missing or not an integer.
        """
        estimator = str(metadata.get("estimator", "unknown"))
        biased_flag = str(metadata.get("biased", "")).lower() in {"1", "true", "yes"}
        return cls(
            path=str(path),
            estimator=estimator,
            n_examples=_metadata_int(metadata, "n_examples", path),
            n_tokens=_metadata_int(metadata, "n_tokens", path),
            data=metadata.get("data") or None,
            model=metadata.get("model") or None,
            biased=biased_flag or estimator == "batch",
        )


@dataclass(frozen=True)
class MergeInput:
    """One checkpoint that went into a merge.

    Attributes:
        model: Local path or Hub repo id of the checkpoint.
        weight: The coefficient λ_i actually used.
        fisher: Provenance of its Fisher; None for methods that use none.
        license: The license in the input's own README metadata, if any.
        base_model: For PEFT adapters, the adapter's ``base_model_name_or_path``.
    """

    model: str
    weight: float
    fisher: FisherProvenance | None
    license: str | None = None
    base_model: str | None = None


@dataclass(frozen=True)
class MergeCardInfo:
    """Everything a merge card says.

    Attributes:
        method: Registry name of the merge method, e.g. ``fisher`` or ``average``.
        method_description: One paragraph from the merge-method registry.
        citations: BibTeX entries from the registry.
        inputs: The merged checkpoints, in recipe order.
        recipe_yaml: The exact recipe, as YAML.
        library_name: ``transformers`` or ``peft``.
        datasets: Hub dataset ids the Fishers were estimated on, where known.
        repo_id: Where the result will be pushed, for the usage snippet.
    """

    method: str
    method_description: str
    citations: tuple[str, ...]
    inputs: tuple[MergeInput, ...]
    recipe_yaml: str
    library_name: str
    datasets: tuple[str, ...] = ()
    repo_id: str | None = None


@dataclass(frozen=True)
class FederatedCardInfo:
    """Everything a federated-run card says.

    Attributes:
        aggregator: ``fedfish`` or ``fedavg``.
        rounds: Number of rounds run.
        clients_per_round: Clients sampled per round.
        local_epochs: Local epochs per client per round.
        run_config_yaml: The exact run config, as YAML.
        metrics: Rows of the run's ``metrics.jsonl``.
        base_model: The checkpoint the run started from.
        datasets: Hub dataset ids of the federated data, where known.
        library_name: ``transformers`` or ``peft``.
        repo_id: Where the result will be pushed, for the usage snippet.
        personalization: Summary of the personalization evaluation, if one was run.
    """

    aggregator: str
    rounds: int
    clients_per_round: int
    local_epochs: int
    run_config_yaml: str
    metrics: tuple[dict, ...]
    base_model: str | None
    datasets: tuple[str, ...]
    library_name: str
    repo_id: str | None = None
    personalization: dict | None = None


def render_merge_card(info: MergeCardInfo) -> ModelCard:
    """Render the model card of a merged checkpoint.

    Args:
        info: What the merge was made of and how.

    Returns:
        The card; ``card.save(folder / "README.md")`` writes it.

    Raises:
        ConfigError: The inputs make invalid metadata (unknown library, bad repo id in ``repo_id``).
    """
    _check_library(info.library_name)
    if not info.inputs:
        raise ConfigError("a merge card needs at least one input: pass the merged checkpoints in MergeCardInfo.inputs")
    is_peft = info.library_name == "peft"
    adapter_bases = _unique(i.base_model for i in info.inputs if i.base_model)
    hub_parents = adapter_bases if is_peft else _unique(i.model for i in info.inputs)
    base_models = [m for m in hub_parents if is_repo_id(m)]
    license_id, license_note = _agreed_license(info.inputs)
    tags = ["fishmerge", "merge"] + ([_METHOD_TAGS[info.method]] if info.method in _METHOD_TAGS else [])
    data = ModelCardData(
        base_model=base_models or None,
        datasets=_hub_datasets(info.datasets),
        library_name=info.library_name,
        license=license_id,
        pipeline_tag="text-generation",
        tags=tags,
        # An adapter merge is still an adapter of its base model; the Hub's "merge" relation is for full models.
        base_model_relation=("adapter" if is_peft else "merge") if base_models else None,
    )
    citations = list(info.citations) + ([FISHER_MERGING_BIBTEX, FEDFISH_BIBTEX] if info.method == "fisher" else [])
    card = ModelCard.from_template(
        data,
        template_str=_template(MERGE_TEMPLATE),
        title=_title(info.repo_id, f"{info.method} merge of {len(info.inputs)} models"),
        method=info.method,
        method_description=" ".join(info.method_description.split()),
        input_rows=_input_rows(info.inputs),
        fisher_rows=_fisher_rows(info.inputs),
        any_biased=any(i.fisher is not None and i.fisher.biased for i in info.inputs),
        license_note=license_note,
        recipe_yaml=info.recipe_yaml.strip(),
        usage=_usage(info.library_name, info.repo_id, adapter_bases[0] if adapter_bases else None),
        citations=_dedupe_citations(citations),
    )
    validate_card(card)
    return card


def render_federated_card(info: FederatedCardInfo) -> ModelCard:
    """Render the model card of a federated run's final global model.

    Args:
        info: The run's configuration, metrics and optional personalization summary.

    Returns:
        The card; ``card.save(folder / "README.md")`` writes it.

    Raises:
        ConfigError: The inputs make invalid metadata (unknown library, bad repo id in ``repo_id``).
    """
    _check_library(info.library_name)
    aggregator = info.aggregator.lower()
    base_models = [info.base_model] if info.base_model and is_repo_id(info.base_model) else []
    tags = ["fishmerge", "federated-learning"]
    tags += [_AGGREGATOR_TAGS[aggregator]] if aggregator in _AGGREGATOR_TAGS else []
    data = ModelCardData(
        base_model=base_models or None,
        datasets=_hub_datasets(info.datasets),
        library_name=info.library_name,
        pipeline_tag="text-generation",
        tags=tags,
        base_model_relation=("adapter" if info.library_name == "peft" else "finetune") if base_models else None,
    )
    citations = [FEDFISH_BIBTEX] + ([FISHER_MERGING_BIBTEX] if aggregator == "fedfish" else [FEDAVG_BIBTEX])
    columns, rows = _metrics_table(info.metrics)
    card = ModelCard.from_template(
        data,
        template_str=_template(FEDERATED_TEMPLATE),
        title=_title(info.repo_id, f"{_AGGREGATOR_NAMES.get(aggregator, info.aggregator)} federated model"),
        aggregator=_AGGREGATOR_NAMES.get(aggregator, info.aggregator),
        aggregator_description=_AGGREGATOR_DESCRIPTIONS.get(aggregator, ""),
        start_model=info.base_model,
        dataset_names=list(info.datasets),
        rounds=info.rounds,
        clients_per_round=info.clients_per_round,
        local_epochs=info.local_epochs,
        run_config_yaml=info.run_config_yaml.strip(),
        metric_columns=columns,
        metric_rows=rows,
        has_csb=any(c.startswith("csb_") for c in columns),
        n_metric_rows=len(info.metrics),
        personalization=_personalization(info.personalization),
        usage=_usage(info.library_name, info.repo_id, info.base_model),
        citations=_dedupe_citations(citations),
    )
    validate_card(card)
    return card


def validate_card(card: ModelCard) -> None:
    """Check a card's YAML metadata offline against the rules the Hub enforces on model repos.

    Args:
        card: The card, e.g. from :func:`render_merge_card` or ``ModelCard.load(path)``.

    Raises:
        ConfigError: The first rule the metadata breaks, with the fix.
    """
    meta = card.data.to_dict()
    if not meta:
        raise ConfigError(
            "model card has no YAML metadata: start README.md with a '---' block holding at least library_name and tags"
        )
    _check_optional_str(meta, "library_name")
    _check_optional_str(meta, "pipeline_tag")
    if "tags" in meta:
        tags = meta["tags"]
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t.strip() for t in tags):
            raise ConfigError(f"model card metadata: tags must be a non-empty list of non-empty strings, got {tags!r}")
    for key in ("base_model", "datasets"):
        for entry in _str_or_list(meta, key):
            _check_repo_id_entry(key, entry)
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            allowed = ", ".join(sorted(BASE_MODEL_RELATIONS))
            raise ConfigError(f"model card metadata: base_model_relation {relation!r} is unknown: use one of {allowed}")
        if "base_model" not in meta:
            raise ConfigError(
                "model card metadata: base_model_relation without base_model: add base_model or remove the relation"
            )
    if "license" in meta:
        license_id = meta["license"]
        if not isinstance(license_id, str) or license_id not in HUB_LICENSES:
            raise ConfigError(
                f"model card metadata: license {license_id!r} is not a Hub license id: use e.g. apache-2.0, mit or "
                "'other' (with license_name and license_link)"
            )
    for key in ("language", "metrics"):
        _str_or_list(meta, key)


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local folder.

    A string that exists on disk is a local path even when it would also be valid repo-id syntax
    (``outputs/client1``), because that is what the merge actually read.
    """
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- helpers


def _template(name: str) -> str:
    return importlib.resources.files("fishmerge.hub_cards").joinpath(name).read_text(encoding="utf-8")


def _metadata_int(metadata: Mapping[str, str], key: str, path: str | Path) -> int:
    try:
        return int(metadata[key])
    except (KeyError, ValueError):
        raise ConfigError(
            f"Fisher at {path} has no integer {key!r} in its safetensors metadata: "
            "re-run `fishmerge estimate` to rewrite it"
        ) from None


def _check_library(library_name: str) -> None:
    if library_name not in LIBRARIES:
        raise ConfigError(f"library_name {library_name!r} is not supported: use one of {', '.join(sorted(LIBRARIES))}")


def _check_optional_str(meta: Mapping[str, Any], key: str) -> None:
    if key in meta and (not isinstance(meta[key], str) or not meta[key].strip()):
        raise ConfigError(f"model card metadata: {key} must be a non-empty string, got {meta[key]!r}")


def _str_or_list(meta: Mapping[str, Any], key: str) -> list[str]:
    value = meta.get(key)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"model card metadata: {key} must be a string or a non-empty list of strings, got {value!r}")
    return values


def _check_repo_id_entry(key: str, entry: str) -> None:
    try:
        validate_repo_id(entry)
    except HFValidationError:
        raise ConfigError(
            f"model card metadata: {key} entry {entry!r} is not a Hub repo id: list only ids like namespace/name "
            f"under {key} and mention local paths in the card body"
        ) from None


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _hub_datasets(datasets: Sequence[str]) -> list[str] | None:
    hub = [d for d in _unique(datasets) if is_repo_id(d)]
    return hub or None


def _agreed_license(inputs: Sequence[MergeInput]) -> tuple[str | None, str | None]:
    """The license every input declares, or None with a note for the card body."""
    declared = {i.license.strip().lower() if i.license else None for i in inputs}
    if len(declared) != 1 or None in declared:
        return None, (
            "The inputs do not all declare the same license, so none is set here: "
            "check each input's license before using this model."
        )
    (license_id,) = declared
    if license_id not in HUB_LICENSES:
        return None, (
            f"All inputs declare the license `{license_id}`, which is not a Hub license id: "
            "check its terms before using this model."
        )
    return license_id, None


def _title(repo_id: str | None, fallback: str) -> str:
    return repo_id.split("/")[-1] if repo_id else fallback[:1].upper() + fallback[1:]


def _cell(value: Any) -> str:
    """A value as one Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _model_ref(model: str) -> str:
    return f"[{_cell(model)}]({HUB_URL}/{model})" if is_repo_id(model) else f"`{_cell(model)}`"


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _cell(value if value is not None else "–")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return _cell(value)


def _input_rows(inputs: Sequence[MergeInput]) -> list[dict[str, str]]:
    total = sum(i.weight for i in inputs)
    return [
        {
            "model": _model_ref(i.model),
            "weight": f"{i.weight:g}",
            "share": f"{i.weight / total:.4f}" if total > 0 else "–",
            "license": _cell(i.license) if i.license else "–",
            "base_model": _model_ref(i.base_model) if i.base_model else "–",
        }
        for i in inputs
    ]


def _fisher_rows(inputs: Sequence[MergeInput]) -> list[dict[str, str]]:
    return [
        {
            "model": _model_ref(i.model),
            "estimator": _cell(i.fisher.estimator) + (" (biased)" if i.fisher.biased else ""),
            "n_examples": f"{i.fisher.n_examples:,}",
            "n_tokens": f"{i.fisher.n_tokens:,}",
            "data": _cell(i.fisher.data) if i.fisher.data else "–",
            "path": _cell(i.fisher.path),
        }
        for i in inputs
        if i.fisher is not None
    ]


def _metrics_table(metrics: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the results table: the last evaluation rounds, plus the final row."""
    evaluated = [i for i, row in enumerate(metrics) if any(k.startswith("eval_") for k in row)]
    picked = evaluated[-_TABLE_ROWS:]
    if metrics and len(metrics) - 1 not in picked:
        picked = picked[-(_TABLE_ROWS - 1) :] + [len(metrics) - 1] if picked else [len(metrics) - 1]
    rows = [metrics[i] for i in picked]
    present = {k for row in rows for k in row}
    extra_eval = sorted(k for k in present if k.startswith("eval_") and k not in _PREFERRED_METRICS)
    columns = [k for k in _PREFERRED_METRICS if k in present] + extra_eval
    return columns, [[_number(row.get(c)) for c in columns] for row in rows]


def _personalization(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Split a personalization summary into a stats table (dict-valued entries) and scalar facts."""
    if not summary:
        return None
    tables = {k: v for k, v in summary.items() if isinstance(v, Mapping)}
    stats = _unique(s for v in tables.values() for s in v)
    return {
        "columns": stats,
        "rows": [[_cell(name)] + [_number(values.get(s)) for s in stats] for name, values in tables.items()],
        "facts": [(_cell(k), _number(v)) for k, v in summary.items() if k not in tables],
    }


def _usage(library_name: str, repo_id: str | None, base_model: str | None) -> dict[str, str | bool]:
    return {
        "peft": library_name == "peft",
        "model": repo_id or "path/to/this/folder",
        "base_model": base_model or "path/to/base-model",
    }


def _dedupe_citations(citations: Iterable[str]) -> list[str]:
    """Keep the first entry of each BibTeX key, in order."""
    seen: dict[str, str] = {}
    for entry in citations:
        entry = entry.strip()
        match = _CITATION_KEY.search(entry)
        seen.setdefault(match.group(1) if match else entry, entry)
    return list(seen.values())
