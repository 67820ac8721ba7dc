"""Model cards: golden files, metadata rules and offline validation.

Regenerate the golden files after an intended change with ``FISHMERGE_UPDATE_GOLDEN=1 pytest tests/test_cards.py``
and review the diff.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from fishmerge.cards import (
    FederatedCardInfo,
    FisherProvenance,
    MergeCardInfo,
    MergeInput,
    render_federated_card,
    render_merge_card,
    validate_card,
)
from fishmerge.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"

METHOD_DESCRIPTION = (
    "Fisher-weighted averaging: every parameter of every input is weighted by its diagonal Fisher information, "
    "estimated on that input's own data, times the input's weight λ_i, plus a damping δ."
)
RECIPE = """method: fisher
damping: 1.0e-08
models:
  - model: org/llama-tiny-python
    fisher: fishers/python
  - model: org/llama-tiny-rust
    fisher: fishers/rust
"""


def fisher(path: str, estimator: str = "empirical", n_examples: int = 1000, n_tokens: int = 24000) -> FisherProvenance:
    return FisherProvenance(
        path=path,
        estimator=estimator,
        n_examples=n_examples,
        n_tokens=n_tokens,
        data="org/stack-python" if "python" in path else None,
        model=None,
        biased=estimator == "batch",
    )


def merge_info(**overrides) -> MergeCardInfo:
    info = MergeCardInfo(
        method="fisher",
        method_description=METHOD_DESCRIPTION,
        citations=(),
        inputs=(
            MergeInput("org/llama-tiny-python", 1000.0, fisher("fishers/python"), license="apache-2.0"),
            MergeInput("org/llama-tiny-rust", 500.0, fisher("fishers/rust", "batch", 500, 11000), license="Apache-2.0"),
        ),
        recipe_yaml=RECIPE,
        library_name="transformers",
        datasets=("org/stack-python",),
        repo_id="someone/llama-tiny-merged",
    )
    return replace(info, **overrides)


def federated_info(**overrides) -> FederatedCardInfo:
    metrics = (
        {"round": 1, "train_loss": 3.2101, "csb_loss": 0.412},
        {"round": 2, "train_loss": 2.9, "eval_loss": 3.05, "eval_accuracy": 0.2113, "csb_loss": 0.3},
        {"round": 3, "train_loss": 2.75, "csb_loss": 0.251},
        {"round": 4, "train_loss": 2.6, "eval_loss": 2.81, "eval_accuracy": 0.2472, "csb_loss": 0.2},
        {"round": 5, "train_loss": 2.55, "csb_loss": 0.19},
    )
    info = FederatedCardInfo(
        aggregator="fedfish",
        rounds=5,
        clients_per_round=8,
        local_epochs=1,
        run_config_yaml="aggregator: fedfish\nrounds: 5\nclients_per_round: 8\nlocal_epochs: 1\n",
        metrics=metrics,
        base_model="org/llama-tiny",
        datasets=("org/stackoverflow-federated",),
        library_name="transformers",
        repo_id="someone/llama-tiny-fedfish",
        personalization={
            "num_clients": 20,
            "pre": {"mean": 0.21, "median": 0.2, "q1": 0.15, "q3": 0.27},
            "post": {"mean": 0.26, "median": 0.25, "q1": 0.19, "q3": 0.31},
            "post_minus_pre": {"mean": 0.05, "median": 0.05, "q1": 0.02, "q3": 0.07},
        },
    )
    return replace(info, **overrides)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FISHMERGE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} is missing: run with FISHMERGE_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: review, then FISHMERGE_UPDATE_GOLDEN=1"


def test_merge_card_matches_golden_file():
    card = render_merge_card(merge_info())
    check_golden("merge_card.md", str(card))
    assert "batch (biased)" in card.text
    assert "biased estimate" in card.text


def test_federated_card_matches_golden_file():
    check_golden("federated_card.md", str(render_federated_card(federated_info())))


def test_rendering_is_deterministic_and_round_trips_through_a_file(tmp_path):
    first, second = str(render_merge_card(merge_info())), str(render_merge_card(merge_info()))
    assert first == second
    render_merge_card(merge_info()).save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert str(loaded) == first
    validate_card(loaded)


def test_merge_metadata():
    meta = render_merge_card(merge_info()).data.to_dict()
    assert meta["base_model"] == ["org/llama-tiny-python", "org/llama-tiny-rust"]
    assert meta["base_model_relation"] == "merge"
    assert meta["tags"] == ["fishmerge", "merge", "fisher-merging"]
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["datasets"] == ["org/stack-python"]


def test_license_kept_when_all_inputs_agree():
    assert render_merge_card(merge_info()).data.license == "apache-2.0"


@pytest.mark.parametrize("second_license", ["mit", None])
def test_license_dropped_when_inputs_disagree(second_license):
    info = merge_info()
    inputs = (info.inputs[0], replace(info.inputs[1], license=second_license))
    card = render_merge_card(replace(info, inputs=inputs))
    assert "license" not in card.data.to_dict()
    assert "do not all declare the same license" in card.text


def test_unknown_agreed_license_is_not_put_in_metadata():
    info = merge_info()
    inputs = tuple(replace(i, license="Some Custom License") for i in info.inputs)
    card = render_merge_card(replace(info, inputs=inputs))
    assert "license" not in card.data.to_dict()
    assert "some custom license" in card.text


def test_local_inputs_stay_out_of_base_model(tmp_path):
    local = tmp_path / "client-1"
    local.mkdir()
    info = merge_info()
    card = render_merge_card(replace(info, inputs=(replace(info.inputs[0], model=str(local)), info.inputs[1])))
    assert card.data.base_model == ["org/llama-tiny-rust"]
    assert f"`{local}`" in card.text


def test_no_hub_inputs_means_no_base_model_nor_relation(tmp_path):
    info = merge_info()
    inputs = tuple(replace(i, model=str(tmp_path)) for i in info.inputs)
    meta = render_merge_card(replace(info, inputs=inputs)).data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta


def test_adapter_merge_points_at_the_adapters_base_model():
    info = merge_info(library_name="peft", method="average", citations=())
    inputs = tuple(replace(i, base_model="org/llama-tiny", fisher=None) for i in info.inputs)
    card = render_merge_card(replace(info, inputs=inputs))
    assert card.data.base_model == ["org/llama-tiny"]
    assert card.data.base_model_relation == "adapter"
    assert card.data.tags == ["fishmerge", "merge", "model-averaging"]
    assert 'PeftModel.from_pretrained(base, "someone/llama-tiny-merged")' in card.text
    assert "## Fisher information" not in card.text


def test_merge_card_cites_fisher_merging_and_fedfish_once():
    info = merge_info(citations=("@inproceedings{matena2022merging,\n  title = {x}\n}",))
    text = render_merge_card(info).text
    assert text.count("@inproceedings{matena2022merging") == 1
    assert "2311.10291" in text


def test_federated_metadata_and_citations():
    card = render_federated_card(federated_info())
    meta = card.data.to_dict()
    assert meta["tags"] == ["fishmerge", "federated-learning", "fedfish"]
    assert meta["base_model"] == ["org/llama-tiny"] and meta["base_model_relation"] == "finetune"
    assert "2311.10291" in card.text and "2111.09832" in card.text
    fedavg = render_federated_card(federated_info(aggregator="fedavg"))
    assert fedavg.data.tags == ["fishmerge", "federated-learning", "fedavg"]
    assert "1602.05629" in fedavg.text


def test_results_table_keeps_evaluation_rounds_and_the_last_round():
    text = render_federated_card(federated_info()).text.split("## Results")[1].split("## ")[0]
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2:3].isdigit()]
    assert [line.split(" | ")[0] for line in table] == ["| 2", "| 4", "| 5"]
    assert "| round | train_loss | eval_loss | eval_accuracy | csb_loss |" in text


def test_federated_card_without_metrics_or_personalization():
    card = render_federated_card(federated_info(metrics=(), personalization=None, base_model=None, repo_id=None))
    assert "No metrics were recorded." in card.text
    assert "## Personalization" not in card.text
    assert "base_model" not in card.data.to_dict()
    assert 'from_pretrained("path/to/this/folder")' in card.text


def test_unknown_library_is_refused():
    with pytest.raises(ConfigError, match="library_name"):
        render_merge_card(merge_info(library_name="timm"))


def test_fisher_provenance_from_metadata():
    meta = {"format": "fishmerge.fisher", "estimator": "batch", "n_examples": "64", "n_tokens": "1200", "model": "m"}
    provenance = FisherProvenance.from_metadata("fishers/a", meta)
    assert provenance == FisherProvenance("fishers/a", "batch", 64, 1200, None, "m", True)
    with pytest.raises(ConfigError, match="n_tokens"):
        FisherProvenance.from_metadata("fishers/a", {"estimator": "empirical", "n_examples": "3"})


VALID_HEADER = "library_name: transformers\ntags:\n- fishmerge\n"


@pytest.mark.parametrize(
    ("yaml_block", "match"),
    [
        ("", "no YAML metadata"),
        ("library_name: transformers\ntags: []\n", "tags must be a non-empty list"),
        ("library_name: transformers\ntags:\n- ''\n", "tags must be a non-empty list"),
        (VALID_HEADER + "library_name: 3\n", "library_name must be a non-empty string"),
        (VALID_HEADER + "base_model:\n- /home/me/ckpt\n", "not a Hub repo id"),
        (VALID_HEADER + "base_model: a--b/c\n", "not a Hub repo id"),
        (VALID_HEADER + "datasets:\n- ./data.jsonl\n", "datasets entry"),
        (VALID_HEADER + "base_model: org/m\nbase_model_relation: blend\n", "base_model_relation"),
        (VALID_HEADER + "base_model_relation: merge\n", "without base_model"),
        (VALID_HEADER + "license: Apache 2.0\n", "not a Hub license id"),
    ],
)
def test_validation_errors(yaml_block, match):
    card = ModelCard(f"---\n{yaml_block}---\n\n# Model\n")
    with pytest.raises(ConfigError, match=match):
        validate_card(card)


def test_validation_accepts_a_hand_written_card():
    extra = "license: other\nbase_model: org/m\nbase_model_relation: merge\n"
    validate_card(ModelCard(f"---\n{VALID_HEADER}{extra}---\n# M\n"))
