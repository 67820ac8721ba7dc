"""The federated driver: FedFish vs FedAvg identities, the merge equivalence, failures, resume, processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from builders import load_state
from fishmerge.config import parse_config
from fishmerge.federated import driver as driver_module
from fishmerge.federated.config import FederatedConfig
from fishmerge.federated.driver import run_federated
from fishmerge.federated.strategy import ClientResult, RoundSums
from fishmerge.merge import merge
from fishmerge.training import EvalResult

TINY = {
    "model": {"new": {"hidden_size": 16, "layers": 1, "heads": 2}, "pretrain": {"sentences": 200, "epochs": 1}},
    "data": {"train_users": 12, "heldout_users": 3, "test_users": 3, "max_examples_per_client": 12, "eval_clients": 3},
    "rounds": 2,
    "clients_per_round": 4,
    "client": {"lr": 0.1, "batch_size": 8},
    "personalization": {"enabled": False},
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fedcache")


def _config(tmp_path, cache_dir, **overrides) -> FederatedConfig:
    data = yaml.safe_load(yaml.safe_dump(TINY)) | {"output_dir": str(tmp_path / "run"), "cache_dir": str(cache_dir)}
    for key, value in overrides.items():
        data[key] = value
    return parse_config(FederatedConfig, data, "test")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _result(n, delta, fisher):
    return ClientResult("c", n, delta, fisher, 0.0, EvalResult(0.0, 0.0, 1))


def test_fedfish_with_equal_fishers_equals_fedavg():
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(4, 3, generator=g)} for _ in range(3)]
    shared = {"w": torch.rand(4, 3, generator=g)}
    fish, avg = RoundSums.zeros({"w": torch.zeros(4, 3)}, True), RoundSums.zeros({"w": torch.zeros(4, 3)}, False)
    for n, delta in zip((5, 10, 20), deltas):
        fish.add(_result(n, delta, shared), damping=1e-6)
        avg.add(_result(n, delta, None), damping=1e-6)
    expected = sum(n * d["w"] for n, d in zip((5, 10, 20), deltas)) / 35
    torch.testing.assert_close(avg.update()["w"], expected)
    torch.testing.assert_close(fish.update()["w"], expected)
    assert avg.denominator["w"].dim() == 0  # FedAvg sends a scalar denominator: half FedFish's bytes


def test_one_fedfish_round_equals_fishmerge_merge_of_the_clients(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, rounds=1, save_client_updates=True)
    run_federated(config)
    out = Path(config.output_dir)
    record = _metrics(out)[0]
    assert record["round"] == 1 and record["aggregator"] == "fedfish" and len(record["clients"]) == 4
    for key in ("train_loss", "csb_loss", "csb_accuracy", "seconds", "eval_loss", "eval_accuracy",
                "eval_accuracy_no_oov_eos"):
        assert record[key] is not None, key
    clients = sorted((out / "clients" / "round-0001").iterdir())
    recipe = {"method": "fisher", "damping": config.fisher.damping, "dtype": "float32",
              "models": [{"model": str(c / "model"), "fisher": str(c / "fisher")} for c in clients]}
    merged = load_state(merge(recipe, tmp_path / "merged"))
    global_state = load_state(out / "checkpoints" / "round-0001", "global_state")
    for name, value in global_state.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-4, atol=1e-6)


def test_fisher_max_examples_estimates_at_theta_i_on_a_seeded_subsample(tmp_path, cache_dir):
    from conftest import tiny_llama

    from fishmerge.federated.strategy import client_update, fisher_examples
    from fishmerge.fisher.accumulate import accumulate_fisher
    from fishmerge.textdata import batches

    model = tiny_llama(vocab_size=30, seed=0)
    params = dict(model.named_parameters())
    global_state = {name: p.detach().clone() for name, p in params.items()}
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 30, (int(n),), generator=g).tolist() for n in torch.randint(3, 9, (10,), generator=g)]
    config = _config(tmp_path, cache_dir, fisher={"max_examples": 4, "batch_size": 3})
    result = client_update(model, params, global_state, sequences, config, client_id="c", seed=7, pad_id=0)
    chosen = fisher_examples(sequences, 4, seed=7)
    assert len(chosen) == 4 and all(s in sequences for s in chosen)
    assert result.n_examples == 10  # the aggregation weight n_i still counts every example
    # The oracle: the Fisher of the client's trained model θ_i on exactly those four examples.
    expected = accumulate_fisher(model, params, batches(chosen, 3, 0), progress=False).mean()
    for name, value in expected.items():
        torch.testing.assert_close(result.fisher[name], value)
    everything = accumulate_fisher(model, params, batches(sequences, 3, 0), progress=False).mean()
    assert not torch.allclose(result.fisher["model.embed_tokens.weight"], everything["model.embed_tokens.weight"])
    assert fisher_examples(sequences, None, seed=7) == sequences


def test_a_failing_client_is_skipped_and_the_round_goes_on(tmp_path, cache_dir, monkeypatch):
    real = driver_module.client_update
    victims = []

    def flaky(*args, client_id, **kwargs):
        if not victims:
            victims.append(client_id)
            raise RuntimeError("device lost")
        return real(*args, client_id=client_id, **kwargs)

    monkeypatch.setattr(driver_module, "client_update", flaky)
    config = _config(tmp_path, cache_dir, rounds=1)
    run_federated(config)
    record = _metrics(Path(config.output_dir))[0]
    assert record["skipped"] == victims and len(record["clients"]) == 3 and victims[0] not in record["clients"]


def test_non_finite_clients_never_reach_the_global_model(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, rounds=1, client={"lr": 1e12, "batch_size": 8})
    run_federated(config)
    out = Path(config.output_dir)
    record = _metrics(out)[0]
    assert len(record["skipped"]) == 4 and record["clients"] == []
    state = load_state(out / "checkpoints" / "round-0001", "global_state")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_resume_after_an_interruption_reaches_the_same_result(tmp_path, cache_dir, monkeypatch):
    full = _config(tmp_path / "a", cache_dir, rounds=3, aggregator="fedfish", server={"optimizer": "adam", "lr": 0.01})
    run_federated(full)
    broken = _config(tmp_path / "b", cache_dir, rounds=3, aggregator="fedfish", server={"optimizer": "adam", "lr": 0.01})
    real = driver_module.run_round

    def crash_on_third(run, round_index):
        if round_index == 2:
            raise KeyboardInterrupt
        return real(run, round_index)

    monkeypatch.setattr(driver_module, "run_round", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_federated(broken)
    monkeypatch.setattr(driver_module, "run_round", real)
    with pytest.raises(Exception, match="--resume"):
        run_federated(broken)
    run_federated(broken, resume=True)
    a, b = Path(full.output_dir), Path(broken.output_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_metrics(a)) == strip(_metrics(b))
    sa, sb = load_state(a / "final"), load_state(b / "final")
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0)


def test_resume_refuses_a_changed_config(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, rounds=1)
    run_federated(config)
    changed = _config(tmp_path, cache_dir, rounds=2, local_epochs=3)
    with pytest.raises(Exception, match="local_epochs"):
        run_federated(changed, resume=True)


def test_personalization_writes_per_client_rows_and_a_summary(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, rounds=1, personalization={"enabled": True, "split": "test"})
    run_federated(config)
    folder = Path(config.output_dir) / "personalization"
    rows = [json.loads(line) for line in (folder / "clients.jsonl").read_text().splitlines()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["clients"] == len(rows) > 0
    for key in ("pre_accuracy", "post_accuracy", "delta_accuracy", "pre_loss", "post_loss"):
        values = sorted(r[key] for r in rows)
        assert summary[key]["q1"] <= summary[key]["median"] <= summary[key]["q3"]
        assert min(values) <= summary[key]["mean"] <= max(values)
    for row in rows:
        assert abs(row["delta_accuracy"] - (row["post_accuracy"] - row["pre_accuracy"])) < 1e-12
    card = (Path(config.output_dir) / "final" / "README.md").read_text()
    assert "federated-learning" in card and "fedfish" in card


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, cache_dir):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(TINY | {"cache_dir": str(cache_dir)}))
    run_federated(_config(tmp_path / "warm", cache_dir, rounds=1))  # data and pretrained model cached first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    outputs = {}
    for n in (1, 2):
        outputs[n] = tmp_path / f"p{n}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   "-m", "fishmerge", "federate", "--config", str(config_file), "--output-dir", str(outputs[n])]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = _metrics(outputs[1]), _metrics(outputs[2])
    for r1, r2 in zip(one, two):
        assert r1["clients"] == r2["clients"]
        for key in ("train_loss", "csb_loss", "eval_loss", "eval_accuracy"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6)
    s1, s2 = load_state(outputs[1] / "final"), load_state(outputs[2] / "final")
    for name in s1:
        torch.testing.assert_close(s1[name], s2[name], rtol=1e-4, atol=1e-6)


def test_lora_runs_train_and_aggregate_only_the_adapter(tmp_path, cache_dir):
    config = _config(tmp_path, cache_dir, rounds=1, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    run_federated(config)
    state = load_state(Path(config.output_dir) / "checkpoints" / "round-0001", "global_state")
    assert state and all("lora_" in name for name in state)
    assert (Path(config.output_dir) / "final" / "adapter_model.safetensors").exists()


def test_dataset_source_uses_the_models_own_tokenizer(tmp_path, cache_dir):
    import datasets

    from builders import WORDS, save_model

    model = save_model(tmp_path / "ckpt", seed=0)
    rows = [{"user_id": u, "text": " ".join(WORDS[(u * 5 + k) % len(WORDS)] for k in range(4 + i % 3))}
            for u in range(8) for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    config = _config(tmp_path, cache_dir, rounds=1, clients_per_round=3,
                     model={"path": str(model)}, data={"source": "dataset", "path": str(tmp_path / "ds"),
                                                       "eval_clients": 2, "min_examples": 2})
    run_federated(config)
    record = _metrics(Path(config.output_dir))[0]
    assert len(record["clients"]) == 3 and record["eval_loss"] > 0
    assert "eval_accuracy_no_oov_eos" not in record  # no word-level exclusions for a subword tokenizer


def test_posts_xml_clients_from_the_shared_samples(tmp_path, cache_dir, stackexchange_dir):
    config = _config(tmp_path, cache_dir, rounds=1, clients_per_round=2,
                     data={"source": "posts_xml", "path": str(stackexchange_dir / "beer.Posts.xml"),
                           "min_examples": 10, "eval_clients": 2, "max_examples_per_client": 8})
    run_federated(config)
    record = _metrics(Path(config.output_dir))[0]
    assert len(record["clients"]) == 2 and record["eval_accuracy_no_oov_eos"] is not None


def test_personalize_plot_and_pretrain_commands(tmp_path, cache_dir):
    from fishmerge.cli.main import main

    config = _config(tmp_path, cache_dir, rounds=2)
    run_federated(config)
    run_dir = Path(config.output_dir)
    assert main(["personalize", str(run_dir), "--split", "heldout"]) == 0
    summary = json.loads((run_dir / "personalization" / "summary-heldout.json").read_text())
    assert summary["clients"] > 0 and "delta_accuracy" in summary
    png = tmp_path / "curves.png"
    assert main(["plot", str(run_dir), str(run_dir), "--label", "a", "--label", "b", "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(TINY | {"cache_dir": str(cache_dir)}))
    assert main(["pretrain", "--config", str(config_file), "--out", str(tmp_path / "pre")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pre")
    assert AutoTokenizer.from_pretrained(tmp_path / "pre").unk_token == "<OOV>"
    assert model.config.hidden_size == 16


def test_unknown_config_keys_are_named(tmp_path, capsys):
    from fishmerge.cli.main import main

    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({"client": {"learning_rate": 0.1}, "rouds": 3}))
    assert main(["federate", "--config", str(config_file), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "client.learning_rate: unknown key" in err and "rouds: unknown key" in err
    assert not (tmp_path / "o").exists()
