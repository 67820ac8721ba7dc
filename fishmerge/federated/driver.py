"""`fishmerge federate`: the round loop, and the only federated code that knows about processes.

Run it as is, or under ``accelerate launch`` / ``torchrun`` on any number of CPUs, GPUs or machines: the
clients of a round are spread over the processes, each process adds up the terms of its clients, and only
those two sums (and a few scalars) are all-reduced (SPEC §3), so the scheme stays compatible with secure
aggregation. Every process then applies the same server step to the same global model.

Each round appends one JSON line to ``OUTPUT/metrics.jsonl`` and checkpoints the global model in Hugging
Face format; ``--resume`` continues after the last complete round and reaches the same results as an
uninterrupted run with the same seed, because every random choice is derived from (seed, round, client).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fishmerge.errors import ConfigError, OutputError
from fishmerge.federated.config import FederatedConfig
from fishmerge.federated.data import FederatedData, load_federated_data, sample_clients, subsample
from fishmerge.federated.models import default_cache_dir, load_global_model, load_state, pretrained_folder, trainable
from fishmerge.federated.personalize import personalize_client, summarize
from fishmerge.federated.strategy import ClientResult, RoundSums, ServerOptimizer, client_update
from fishmerge.textdata import batches
from fishmerge.training import EvalResult, evaluate
from fishmerge.writer import atomic_output_dir, save_tensors

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"


def derived_seed(*parts: int) -> int:
    """A 31-bit seed from integers, the same in every process and Python run."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Run:
    """What every hook of the loop needs."""

    config: FederatedConfig
    accelerator: object
    data: FederatedData
    model: torch.nn.Module
    params: dict[str, torch.nn.Parameter]
    server: ServerOptimizer
    client_index: dict[str, int]

    @property
    def pad_id(self) -> int:
        return self.data.tokenizer.pad_token_id

    def client_data(self, client_id: str, round_index: int) -> list[list[int]]:
        index = self.client_index[client_id]
        return subsample(self.data.sequences("train", client_id), self.config.data.max_examples_per_client,
                         self.config.seed, round_index, index)


def run_federated(config: FederatedConfig, *, resume: bool = False, repo_id: str | None = None) -> Path:
    """Run (or resume) the federated training of ``config``; return the final model's folder."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out = Path(config.output_dir)
    start = _check_output(config, out, resume)  # every process checks, so a refusal never leaves one waiting
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _init_output(config, out, start)
    run = _setup(config, accelerator)
    if start:
        _restore(run, out / "checkpoints" / f"round-{start:04d}")
        logger.info("resuming after round %d", start)
    for round_index in range(start, config.rounds):
        record = run_round(run, round_index)
        if accelerator.is_main_process:
            _checkpoint(run, out, round_index + 1, record)
        accelerator.wait_for_everyone()
    final = _finish(run, out, repo_id)
    accelerator.wait_for_everyone()
    return final


def _setup(config: FederatedConfig, accelerator) -> Run:
    cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    tokenizer = None
    if config.model.path is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model.path)
    with accelerator.main_process_first():  # the data and the pretrained model are built once, then read
        data = load_federated_data(config.data, cache, tokenizer)
        folder = pretrained_folder(config, data.tokenizer, cache)
    model = load_global_model(folder, config.model.dtype, config.lora, accelerator.device)
    params = trainable(model)
    server = ServerOptimizer({name: p.detach() for name, p in params.items()}, config.server)
    logger.info("%s; %d train clients; %d trainable parameters", data.description, len(data.train_clients),
                sum(p.numel() for p in params.values()))
    index = {client: i for i, client in enumerate(data.train_clients)}
    return Run(config, accelerator, data, model, params, server, index)


# ---- the round: configure, fit on clients, aggregate, evaluate --------------------------------------------


def run_round(run: Run, round_index: int) -> dict:
    """One round; returns its metrics record (the same on every process)."""
    started = time.perf_counter()
    acc, config = run.accelerator, run.config
    run.data.forget("train")
    clients = sample_clients(run.data.train_clients, config.clients_per_round, config.seed, round_index)
    mine = clients[acc.process_index :: acc.num_processes]
    global_state = run.server.state()
    sums = RoundSums.zeros(global_state, fedfish=config.aggregator == "fedfish")
    results: list[ClientResult] = []
    skipped: list[str] = []
    for client_id in tqdm(mine, desc=f"round {round_index + 1}", unit="client", leave=False,
                          disable=not acc.is_local_main_process):
        try:
            result = client_update(run.model, run.params, global_state, run.client_data(client_id, round_index),
                                   config, client_id=client_id, pad_id=run.pad_id, exclude_ids=run.data.exclude_ids,
                                   seed=derived_seed(config.seed, round_index, run.client_index[client_id], 2))
        except Exception as err:  # a failed client is data: logged, skipped, the round goes on
            logger.warning("round %d: client %s skipped: %s", round_index + 1, client_id, err)
            logger.debug("client failure", exc_info=True)
            skipped.append(client_id)
            continue
        sums.add(result, config.fisher.damping)
        results.append(result)
        if config.save_client_updates:
            _save_client(run, result, round_index)
    stats = _reduce_sums(acc, sums)
    if stats["clients"] > 0:
        load_state(run.params, run.server.step(sums.update()))
    else:
        logger.warning("round %d: every client failed; the global model is unchanged", round_index + 1)
        load_state(run.params, global_state)
    record = {
        "round": round_index + 1,
        "aggregator": config.aggregator,
        "clients": _gather_lists(acc, [r.client_id for r in results]),
        "skipped": _gather_lists(acc, skipped),
        "examples": int(stats["examples"]),
        "train_loss": stats["train_loss"] / stats["clients"] if stats["clients"] else None,
        **_client_server_barrier(run, results, round_index),
    }
    last = round_index + 1 == config.rounds
    if (round_index + 1) % config.eval.every == 0 or last:
        record |= evaluate_global(run, config.eval.split).as_dict("eval_")
    record["seconds"] = time.perf_counter() - started
    return record


def _save_client(run: Run, result: ClientResult, round_index: int) -> None:
    """Write θ_i (the model right after the client's update) and F_i, for inspection or an offline merge."""
    from fishmerge.estimate import parameter_keys
    from fishmerge.fisher.accumulate import FisherSums, fisher_metadata, save_fisher

    folder = Path(run.config.output_dir) / "clients" / f"round-{round_index + 1:04d}" / result.client_id
    run.model.save_pretrained(folder / "model")
    run.data.tokenizer.save_pretrained(folder / "model")
    if result.fisher is not None:
        sums = FisherSums(result.fisher, result.n_examples, 0, run.config.fisher.estimator)
        save_fisher(folder / "fisher", parameter_keys(run.model, result.fisher),
                    fisher_metadata(sums, model=str(folder / "model"), data=f"client {result.client_id}"))


def _reduce_sums(acc, sums: RoundSums) -> dict[str, float]:
    device = next(iter(sums.numerator.values())).device
    stats = torch.tensor([sums.stats[k] for k in ("clients", "examples", "train_loss")], dtype=torch.float64,
                         device=device)
    if acc.num_processes > 1:
        for name in sums.numerator:
            sums.numerator[name] = acc.reduce(sums.numerator[name], reduction="sum")
            sums.denominator[name] = acc.reduce(sums.denominator[name], reduction="sum")
        stats = acc.reduce(stats, reduction="sum")
    return dict(zip(("clients", "examples", "train_loss"), stats.tolist()))


def _client_server_barrier(run: Run, results: list[ClientResult], round_index: int) -> dict:
    """CSB_t = mean over the round's clients of L_i(θ_{t+1}) − L_i(θ_i) on their training data (SPEC §4)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for result in results:
        sequences = run.client_data(result.client_id, round_index)
        after = evaluate(run.model, batches(sequences, run.config.client.batch_size, run.pad_id),
                         exclude_ids=run.data.exclude_ids)
        totals += torch.tensor([1.0, after.loss - result.local.loss, result.local.accuracy - after.accuracy],
                               dtype=torch.float64)
    if run.accelerator.num_processes > 1:
        totals = run.accelerator.reduce(totals.to(run.accelerator.device), reduction="sum").cpu()
    count = float(totals[0])
    if count == 0:
        return {"csb_loss": None, "csb_accuracy": None}
    return {"csb_loss": float(totals[1]) / count, "csb_accuracy": float(totals[2]) / count}


def evaluate_global(run: Run, split: str) -> EvalResult:
    """The global model on every evaluation client's data together (token-weighted)."""
    sequences = [s for client in run.data.eval_clients[split] for s in run.data.sequences(split, client)]
    if not sequences:
        raise ConfigError(f"no {split} clients to evaluate on: the data has no {split} split with enough examples")
    return evaluate(run.model, batches(sequences, 64, run.pad_id), exclude_ids=run.data.exclude_ids)


def _gather_lists(acc, items: list[str]) -> list[str]:
    if acc.num_processes == 1:
        return sorted(items)
    from accelerate.utils import gather_object

    return sorted(gather_object(items))


# ---- output folder: config, metrics, checkpoints, resume -----------------------------------------------------


def _check_output(config: FederatedConfig, out: Path, resume: bool) -> int:
    """Refuse to mix runs; return the number of rounds already complete (reads only)."""
    saved = out / CONFIG_FILE
    if resume and saved.exists():
        _check_same_run(config, saved)
        return _completed_rounds(out)
    if (out / METRICS_FILE).exists() or saved.exists():
        raise OutputError(f"{out} already holds a run: pass --resume to continue it, or choose another --output-dir")
    return 0


def _init_output(config: FederatedConfig, out: Path, done: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(config.to_yaml())  # rounds may have grown on resume
    _truncate_metrics(out / METRICS_FILE, done)


def _check_same_run(config: FederatedConfig, saved: Path) -> None:
    import yaml

    before = yaml.safe_load(saved.read_text())
    now = config.model_dump(mode="json")
    differ = [key for key in now if key not in ("rounds",) and now.get(key) != before.get(key)]
    if differ:
        raise ConfigError(f"--resume with a different config ({', '.join(differ)} changed since {saved}): use the "
                          "same config (only rounds may grow), or start a new run in another --output-dir")


def _completed_rounds(out: Path) -> int:
    state = out / STATE_FILE
    return int(json.loads(state.read_text())["round"]) if state.exists() else 0


def _truncate_metrics(path: Path, rounds: int) -> None:
    # A crash between appending a round's line and recording its checkpoint leaves a line to drop.
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["round"] <= rounds]
    path.write_text("".join(line + "\n" for line in keep))


def _checkpoint(run: Run, out: Path, rounds_done: int, record: dict) -> None:
    folder = out / "checkpoints" / f"round-{rounds_done:04d}"
    with atomic_output_dir(folder, overwrite=True) as tmp:
        run.model.save_pretrained(tmp)
        run.data.tokenizer.save_pretrained(tmp)
        save_tensors(tmp, "global_state", {k: v.cpu() for k, v in run.server.state().items()})
        torch.save(run.server.optimizer.state_dict(), tmp / "server_optimizer.pt")
    with (out / METRICS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    state = out / f".{STATE_FILE}.tmp"
    state.write_text(json.dumps({"round": rounds_done, "checkpoint": str(folder.relative_to(out))}))
    os.replace(state, out / STATE_FILE)
    old = sorted((out / "checkpoints").glob("round-*"))[: -run.config.keep_checkpoints]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    logger.info("round %d: %s", rounds_done, _summary(record))


def _summary(record: dict) -> str:
    keys = ("train_loss", "csb_loss", "eval_loss", "eval_accuracy")
    return ", ".join(f"{k} {record[k]:.4f}" for k in keys if record.get(k) is not None)


def _restore(run: Run, folder: Path) -> None:
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise OutputError(f"checkpoint {folder} is missing, so the run cannot resume: start a new run")
    state = {k: v.to(run.accelerator.device) for k, v in load_file(folder / "global_state.safetensors").items()}
    optimizer_state = torch.load(folder / "server_optimizer.pt", map_location=run.accelerator.device, weights_only=True)
    run.server.load(state, optimizer_state)
    load_state(run.params, run.server.state())


def _finish(run: Run, out: Path, repo_id: str | None) -> Path:
    """Save the final model with its card; run personalization; push if asked."""
    acc, config = run.accelerator, run.config
    summary = None
    if config.personalization.enabled:
        rows = personalize(run, config.personalization.split)
        summary = summarize(rows)
        if acc.is_main_process:
            folder = out / "personalization"
            folder.mkdir(exist_ok=True)
            (folder / "clients.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    final = out / "final"
    if acc.is_main_process:
        with atomic_output_dir(final, overwrite=True) as tmp:
            run.model.save_pretrained(tmp)
            run.data.tokenizer.save_pretrained(tmp)
            _federated_card(run, out, summary, repo_id).save(tmp / "README.md")
        logger.info("final model in %s", final)
    return final


def personalize(run: Run, split: str) -> list[dict]:
    """Personalization rows of every evaluation client of ``split``, computed across processes."""
    acc = run.accelerator
    clients = run.data.eval_clients[split]
    global_state = run.server.state()
    rows = []
    for i, client_id in enumerate(clients):
        if i % acc.num_processes != acc.process_index:
            continue
        row = personalize_client(run.model, run.params, global_state, run.data.sequences(split, client_id),
                                 run.config, client_id=client_id, seed=derived_seed(run.config.seed, i, 3),
                                 pad_id=run.pad_id, exclude_ids=run.data.exclude_ids)
        if row is not None:
            rows.append(row)
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    load_state(run.params, global_state)
    return sorted(rows, key=lambda r: r["client"])


def _federated_card(run: Run, out: Path, personalization: dict | None, repo_id: str | None):
    from fishmerge.cards import FederatedCardInfo, is_repo_id, render_federated_card

    config = run.config
    metrics = tuple(json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip())
    base = str(config.model.path) if config.model.path is not None else None
    return render_federated_card(FederatedCardInfo(
        aggregator=config.aggregator,
        rounds=config.rounds,
        clients_per_round=config.clients_per_round,
        local_epochs=config.local_epochs,
        run_config_yaml=config.to_yaml(),
        metrics=metrics,
        base_model=base if base and is_repo_id(base) else None,
        datasets=(),
        library_name="peft" if config.lora is not None else "transformers",
        repo_id=repo_id,
        personalization=personalization,
    ))


def personalize_run(output_dir: Path, split: str | None = None) -> dict:
    """Personalization (SPEC §4) of a run's latest global model, on demand; writes and returns the summary."""
    from accelerate import Accelerator

    from fishmerge.federated.config import load_run_config

    out = Path(output_dir)
    if not (out / CONFIG_FILE).exists() or not (out / STATE_FILE).exists():
        raise OutputError(f"{out} holds no completed round of a run: give the --output-dir of `fishmerge federate`")
    config = load_run_config(out / CONFIG_FILE)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run = _setup(config, accelerator)
    _restore(run, out / json.loads((out / STATE_FILE).read_text())["checkpoint"])
    split = split or config.personalization.split
    rows = personalize(run, split)
    summary = summarize(rows)
    if accelerator.is_main_process:
        folder = out / "personalization"
        folder.mkdir(exist_ok=True)
        (folder / f"clients-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"summary-{split}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
