"""`fishmerge estimate` end to end: data formats, adapters, metadata, bad input, and 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders import WORDS, fails_with_one_line, load_state, save_adapter, save_model
from fishmerge.checkpoint import open_fisher
from fishmerge.cli.main import main
from fishmerge.fisher.persample import causal_lm_nll
from fishmerge.fisher.reference import squared_gradient_sums_loop
from fishmerge.modeling import load_model
from fishmerge.textdata import tokenize

TEXTS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) for i in range(13)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("est") / "model", seed=3)


def _write_jsonl(path: Path, texts, column="text") -> Path:
    path.write_text("".join(json.dumps({column: t, "user": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _oracle(model_dir: Path, texts) -> dict[str, torch.Tensor]:
    """Batch-1 loop over the same tokenized examples, averaged: the reference Fisher."""
    loaded = load_model(model_dir)
    params = loaded.trainable_parameters()
    sequences = tokenize(texts, loaded.tokenizer, 512)
    closures = [causal_lm_nll(loaded.model, {"input_ids": torch.tensor([s])}) for s in sequences]
    sums = squared_gradient_sums_loop(loaded.model, params, closures)
    return {name: value / len(sequences) for name, value in sums.items()}


def test_empirical_fisher_equals_the_batch1_oracle(model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    out = tmp_path / "fisher"
    assert main(["estimate", str(model_dir), str(data), "--out", str(out), "--batch-size", "4", "--device", "cpu"]) == 0
    fisher = open_fisher(out)
    meta = fisher.metadata
    assert meta["format"] == "fishmerge.fisher" and meta["estimator"] == "empirical"
    assert meta["n_examples"] == str(len(TEXTS)) and meta["model"] == str(model_dir)
    assert int(meta["n_tokens"]) == sum(len(t.split()) for t in TEXTS)  # BOS + words: one target per word
    assert meta["fishmerge_version"] and meta["biased"] == "false"
    expected = _oracle(model_dir, TEXTS)
    got = load_state(out, "fisher")
    assert set(got) == set(expected) == set(load_state(model_dir))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("fmt", ["txt", "csv", "parquet", "disk"])
def test_data_formats_give_the_same_fisher(model_dir, tmp_path, fmt):
    import datasets

    dataset = datasets.Dataset.from_dict({"body": TEXTS[:5], "user": list(range(5))})
    path = {"txt": tmp_path / "d.txt", "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet",
            "disk": tmp_path / "d"}[fmt]
    if fmt == "txt":
        path.write_text("\n".join(TEXTS[:5]) + "\n\n")
    elif fmt == "csv":
        dataset.to_csv(str(path))
    elif fmt == "parquet":
        dataset.to_parquet(str(path))
    else:
        dataset.save_to_disk(str(path))
    column = [] if fmt == "txt" else ["--text-column", "body"]
    reference = _write_jsonl(tmp_path / "ref.jsonl", TEXTS[:5])
    assert main(["estimate", str(model_dir), str(path), "--out", str(tmp_path / "f"), *column]) == 0
    assert main(["estimate", str(model_dir), str(reference), "--out", str(tmp_path / "r")]) == 0
    a, b = load_state(tmp_path / "f", "fisher"), load_state(tmp_path / "r", "fisher")
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_sampled_and_batch_estimators_say_what_they_are(model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    for estimator in ("sampled", "batch"):
        out = tmp_path / estimator
        assert main(["estimate", str(model_dir), str(data), "--out", str(out), "--estimator", estimator,
                     "--max-examples", "6", "--seed", "1"]) == 0
        meta = open_fisher(out).metadata
        assert meta["estimator"] == estimator and meta["n_examples"] == "6"
        assert meta["biased"] == ("true" if estimator == "batch" else "false")
    first = load_state(tmp_path / "sampled", "fisher")
    assert main(["estimate", str(model_dir), str(data), "--out", str(tmp_path / "again"), "--estimator", "sampled",
                 "--max-examples", "6", "--seed", "1"]) == 0
    again = load_state(tmp_path / "again", "fisher")
    assert all(torch.equal(first[n], again[n]) for n in first)  # seeded


def test_batch_estimator_with_batch_size_one_is_the_empirical_fisher(model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS[:4])
    for estimator in ("batch", "empirical"):
        assert main(["estimate", str(model_dir), str(data), "--out", str(tmp_path / estimator),
                     "--estimator", estimator, "--batch-size", "1"]) == 0
    a, b = load_state(tmp_path / "batch", "fisher"), load_state(tmp_path / "empirical", "fisher")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-10)


def test_adapter_fisher_covers_only_adapter_parameters_and_merges(model_dir, tmp_path):
    a1 = save_adapter(tmp_path / "lora1", model_dir, seed=1)
    a2 = save_adapter(tmp_path / "lora2", model_dir, seed=2)
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    for name in ("lora1", "lora2"):
        assert main(["estimate", str(tmp_path / name), str(data), "--out", str(tmp_path / f"f{name}")]) == 0
    fisher = load_state(tmp_path / "flora1", "fisher")
    assert set(fisher) == set(load_state(a1, "adapter_model"))
    assert all("lora_" in name for name in fisher) and any(t.abs().sum() > 0 for t in fisher.values())
    assert main(["merge", "--out", str(tmp_path / "merged"), "--model", str(a1), "--fisher", str(tmp_path / "flora1"),
                 "--model", str(a2), "--fisher", str(tmp_path / "flora2")]) == 0
    assert (tmp_path / "merged" / "adapter_model.safetensors").exists()


def test_empty_dataset_and_missing_text_column(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    fails_with_one_line(capsys, ["estimate", model_dir, empty, "--out", tmp_path / "o"], "no non-empty examples")
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS, column="body")
    fails_with_one_line(capsys, ["estimate", model_dir, data, "--out", tmp_path / "o", "--text-column", "txt"],
           "no column 'txt'", "--text-column")
    data2 = _write_jsonl(tmp_path / "d2.jsonl", TEXTS, column="body")
    with open(data2, "a") as f:
        f.write(json.dumps({"body": "x", "title": "y"}) + "\n")
    fails_with_one_line(capsys, ["estimate", model_dir, data2, "--out", tmp_path / "o"], "no 'text' column", "--text-column")
    assert not (tmp_path / "o").exists()


def test_remote_code_is_refused_unless_trusted(model_dir, tmp_path, capsys):
    import shutil

    remote = tmp_path / "remote"
    shutil.copytree(model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    fails_with_one_line(capsys, ["estimate", remote, data, "--out", tmp_path / "o"], "auto_map", "--trust-remote-code")
    assert not (tmp_path / "o").exists()


def test_estimate_output_may_not_be_inside_the_model(model_dir, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    fails_with_one_line(capsys, ["estimate", model_dir, data, "--out", model_dir / "fisher"], "inside input")
    assert not (model_dir / "fisher").exists()


@pytest.mark.slow
def test_two_processes_give_the_single_process_fisher(model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS)
    assert main(["estimate", str(model_dir), str(data), "--out", str(tmp_path / "one"), "--batch-size", "3"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fishmerge", "estimate", str(model_dir), str(data), "--out", str(tmp_path / "two"),
               "--batch-size", "3", "--device", "cpu"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = open_fisher(tmp_path / "two").metadata
    assert meta["processes"] == "2" and meta["n_examples"] == str(len(TEXTS))
    one, two = load_state(tmp_path / "one", "fisher"), load_state(tmp_path / "two", "fisher")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-10)


def test_sharded_checkpoint_fisher_keys_match_the_index(tmp_path):
    model = save_model(tmp_path / "sharded", seed=4, shard="8KB")
    assert (model / "model.safetensors.index.json").exists()
    data = _write_jsonl(tmp_path / "d.jsonl", TEXTS[:4])
    assert main(["estimate", str(model), str(data), "--out", str(tmp_path / "f")]) == 0
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(load_state(tmp_path / "f", "fisher")) == set(index)
