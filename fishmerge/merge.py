"""`fishmerge merge`: plan a merge from a recipe, then execute it tensor by tensor (SPEC §2).

Planning reads only headers and metadata, and performs every check that can fail before any output exists.
Execution streams: for each tensor name it reads that tensor (in blocks of rows) from every input and every
Fisher, merges it with the method's kernel, and writes it into shards planned up front, inside a temporary
folder that is renamed into place only when complete. A reader thread reads the next block while the current
one is merged, into buffers reused from block to block, so memory holds two blocks per input, whatever the size
of the model.
"""

from __future__ import annotations

import functools
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fishmerge import __version__, kernels
from fishmerge.checkpoint import Checkpoint, FisherCheckpoint, copy_aux_files, open_checkpoint, open_fisher
from fishmerge.config import MergeRecipe, load_yaml_config, parse_config
from fishmerge.errors import ConfigError, FisherError, IncompatibleCheckpointsError
from fishmerge.methods import MergeMethod, get_method
from fishmerge.tensorstore import TensorInfo, TensorSource, block_shape, read_ahead, row_blocks
from fishmerge.workspace import Workspace
from fishmerge.writer import ShardedWriter, TensorSpec, atomic_output_dir, check_output_path, parse_size

logger = logging.getLogger(__name__)

# Blocks this small keep every fp32 temporary of the kernel in cache and in memory the allocator reuses;
# 2 MiB and up ran ~3x slower per byte on a 2-core EPYC (fresh pages and cache misses on every temporary).
DEFAULT_BLOCK_BYTES = 2**20
# Blocks read ahead on a background thread while the current one is merged.
READ_AHEAD = 1
# Blocks whose reading from disk the OS is asked to start before they are read: cold files then stream at the
# disk's speed instead of one synchronous read at a time.
PREFETCH = 8
MAX_LISTED = 20


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the output
    rule: str  # "method": the recipe's method; "average": not covered by the Fishers; "copy": non-float, must agree


@dataclass
class MergePlan:
    """Everything a merge needs, validated; executing it reads tensor data and writes the output."""

    recipe: MergeRecipe
    method: MergeMethod
    checkpoints: list[Checkpoint]
    fishers: list[FisherCheckpoint] | None
    weights: list[float]
    fisher_scales: list[float]
    tasks: list[TensorTask]
    base: Path

    @property
    def kind(self) -> str:
        return self.checkpoints[0].kind

    @property
    def inputs(self) -> list[Path]:
        paths = [c.path for c in self.checkpoints] + [f.path for f in self.fishers or []]
        return paths + [self.base]


def load_recipe(recipe: MergeRecipe | Mapping | str | Path) -> MergeRecipe:
    """A validated recipe from a model, a mapping or a YAML file."""
    if isinstance(recipe, MergeRecipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_yaml_config(MergeRecipe, Path(recipe))
    return parse_config(MergeRecipe, recipe, source="recipe")


def plan_merge(recipe: MergeRecipe | Mapping | str | Path) -> MergePlan:
    """Open every input, check that they fit together, and decide how each output tensor is made."""
    recipe = load_recipe(recipe)
    method = get_method(recipe.method)
    checkpoints = [open_checkpoint(entry.model, allow_pickle=recipe.allow_pickle) for entry in recipe.models]
    _check_same_kind(checkpoints)
    _check_same_tensors(checkpoints)
    fishers = _open_fishers(recipe, method, checkpoints)
    if recipe.normalize and fishers is None:
        raise ConfigError("normalize: true needs a Fisher for every model: add `fisher:` entries or drop normalize")
    weights = _resolve_weights(recipe, fishers)
    scales = [_unit_norm_scale(f) for f in fishers] if (recipe.normalize and fishers) else [1.0] * len(checkpoints)
    covered = set(fishers[0].store.names()) if fishers else set()
    tasks = [_task(info, recipe, covered) for info in checkpoints[0].store.tensors.values()]
    parse_size(recipe.max_shard_size)
    base = recipe.base if recipe.base is not None else checkpoints[0].path
    return MergePlan(recipe, method, checkpoints, fishers, weights, scales, tasks, Path(base))


def _check_same_kind(checkpoints: Sequence[Checkpoint]) -> None:
    kinds = {c.kind for c in checkpoints}
    if len(kinds) > 1:
        listed = ", ".join(f"{c.path} ({c.kind})" for c in checkpoints)
        raise IncompatibleCheckpointsError(f"cannot merge full models with PEFT adapters: {listed}; merge like with like")


def _check_same_tensors(checkpoints: Sequence[Checkpoint]) -> None:
    first = checkpoints[0]
    problems = []
    for other in checkpoints[1:]:
        problems += _mismatches(first.store.tensors, other.store.tensors, str(first.path), str(other.path))
    if problems:
        raise IncompatibleCheckpointsError(
            f"the checkpoints do not have the same parameters ({_listing(problems)}): merge checkpoints of one "
            "architecture and size, fine-tuned from the same base"
        )


def _mismatches(reference: Mapping[str, TensorInfo], other: Mapping[str, TensorInfo], ref: str, oth: str) -> list[str]:
    problems = [f"{name} missing from {oth}" for name in reference if name not in other]
    problems += [f"{name} only in {oth}" for name in other if name not in reference]
    problems += [
        f"{name} is {list(info.shape)} in {ref} but {list(other[name].shape)} in {oth}"
        for name, info in reference.items()
        if name in other and other[name].shape != info.shape
    ]
    return problems


def _listing(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:MAX_LISTED])
    more = len(problems) - MAX_LISTED
    return f"{len(problems)} mismatches: {shown}" + (f"; and {more} more" if more > 0 else "")


def _open_fishers(recipe: MergeRecipe, method: MergeMethod, checkpoints: Sequence[Checkpoint]):
    given = [entry.fisher for entry in recipe.models]
    if all(path is None for path in given):
        if method.needs_fisher:
            raise FisherError(
                f"method {method.name!r} needs a Fisher for every model and none was given: add `fisher:` to each "
                "model (run `fishmerge estimate` to make them) or use method average"
            )
        return None
    missing = [str(entry.model) for entry in recipe.models if entry.fisher is None]
    if missing:
        raise FisherError(f"no Fisher given for {', '.join(missing)}: add `fisher:` for every model or for none")
    fishers = [open_fisher(path) for path in given]  # type: ignore[arg-type]
    problems = []
    for fisher, checkpoint in zip(fishers, checkpoints):
        model_tensors = checkpoint.store.tensors
        problems += [f"{name} in {fisher.path} is not a tensor of {checkpoint.path}"
                     for name in fisher.store.tensors if name not in model_tensors]
        problems += [f"{name} is {list(info.shape)} in {fisher.path} but {list(model_tensors[name].shape)} in "
                     f"{checkpoint.path}" for name, info in fisher.store.tensors.items()
                     if name in model_tensors and model_tensors[name].shape != info.shape]
    for fisher in fishers[1:]:
        problems += [f"{name} has a Fisher in {fishers[0].path} but not in {fisher.path}"
                     for name in fishers[0].store.tensors if name not in fisher.store.tensors]
        problems += [f"{name} has a Fisher in {fisher.path} but not in {fishers[0].path}"
                     for name in fisher.store.tensors if name not in fishers[0].store.tensors]
    if problems:
        raise FisherError(
            f"the Fishers do not match their models ({_listing(problems)}): estimate each Fisher on its own "
            "model with `fishmerge estimate`, with the same trainable parameters for every model"
        )
    return fishers


def _resolve_weights(recipe: MergeRecipe, fishers: Sequence[FisherCheckpoint] | None) -> list[float]:
    rule = recipe.weights or ("n_examples" if fishers else "uniform")
    if rule == "n_examples" and fishers is None:
        raise ConfigError("weights: n_examples reads each Fisher's metadata: give Fishers or use weights: uniform")
    weights = [
        entry.weight if entry.weight is not None else float(fishers[i].n_examples if rule == "n_examples" else 1)
        for i, entry in enumerate(recipe.models)
    ]
    if sum(weights) <= 0:
        raise ConfigError("the model weights sum to zero: give at least one model a positive weight")
    return weights


def _unit_norm_scale(fisher: FisherCheckpoint) -> float:
    total = 0.0
    for info in fisher.store.tensors.values():
        for rows in row_blocks(info, DEFAULT_BLOCK_BYTES):
            block = _checked_fisher(fisher, info.name, fisher.store.read(info.name, rows))
            total += kernels.squared_norm(block)
    if total == 0:
        raise FisherError(f"{fisher.path} is zero everywhere, so it cannot be normalised: re-estimate it or drop normalize")
    return 1.0 / math.sqrt(total)


def _task(info: TensorInfo, recipe: MergeRecipe, covered: set[str]) -> TensorTask:
    if not info.dtype.is_floating_point:
        return TensorTask(info.name, info.shape, info.dtype, "copy")
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else info.dtype
    # Float tensors the Fishers do not cover (buffers, frozen parameters) get the λ-weighted average.
    rule = "average" if covered and info.name not in covered else "method"
    return TensorTask(info.name, info.shape, dtype, rule)


def execute_merge(plan: MergePlan, out: Path, *, overwrite: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES,
                  repo_id: str | None = None) -> Path:
    """Write the merged checkpoint into ``out`` (created complete, or not at all).

    ``repo_id`` names the Hub repository the result is meant for, in the model card's usage code.
    """
    out = check_output_path(out, plan.inputs, overwrite=overwrite)
    stem = "adapter_model" if plan.kind == "adapter" else "model"
    specs = [TensorSpec(t.name, t.shape, t.dtype) for t in plan.tasks]
    metadata = {"format": "pt", "merged_by": f"fishmerge {__version__}", "merge_method": plan.method.name}
    max_shard = parse_size(plan.recipe.max_shard_size)
    if plan.kind == "adapter":
        max_shard = max(max_shard, sum(s.nbytes for s in specs))  # PEFT loads adapters from one file only
    with atomic_output_dir(out, overwrite=overwrite) as tmp, ThreadPoolExecutor(1) as side:
        # The card depends on the plan only. Rendering it imports huggingface_hub (~0.3 s), which overlaps with
        # the merge on a side thread: the merge loop spends its time in torch and pread, outside the GIL.
        card = side.submit(_render_card, plan, repo_id)
        writer = ShardedWriter(tmp, stem, specs, max_shard_bytes=max_shard, metadata=metadata)
        _stream(plan, writer, block_bytes)
        writer.close()
        copy_aux_files(plan.base, tmp)
        card.result().save(tmp / "README.md")
    logger.info("merged %d %s into %s", len(plan.checkpoints), "adapters" if plan.kind == "adapter" else "models", out)
    return out


def _stream(plan: MergePlan, writer: ShardedWriter, block_bytes: int) -> None:
    """Merge and write every tensor, block by block. A reader thread reads (and checks) block k + 1 while block k
    is merged, and the OS is asked to start reading block k + PREFETCH from disk."""
    jobs = [(task, rows) for task in plan.tasks
            for rows in row_blocks(plan.checkpoints[0].store.info(task.name), block_bytes)]
    # One workspace per read-ahead slot (filled by the reader thread) and one for the arithmetic.
    buffers = [Workspace() for _ in range(READ_AHEAD + 1)]
    workspace = Workspace()

    def read(k: int, slot: int) -> _Block:
        if k + PREFETCH < len(jobs):
            _prefetch(plan, *jobs[k + PREFETCH])
        return _read_block(plan, *jobs[k], buffers[slot])

    with tqdm(total=sum(t.dtype.itemsize * math.prod(t.shape) for t in plan.tasks), desc="merging", unit="B",
              unit_scale=True, leave=False) as bar:
        for k, block in read_ahead(range(len(jobs)), read, READ_AHEAD):
            task, rows = jobs[k]
            merged = _merge_block(plan, task, block, workspace)
            if merged.dtype != task.dtype:
                merged = workspace.tensor("output", merged.shape, task.dtype).copy_(merged)
            writer.write(task.name, merged)
            bar.update(merged.nbytes)


@dataclass
class _Block:
    """One block of rows of one tensor from every input, stacked along a new first dimension: θ_i, and F_i
    (checked and scaled) when the method uses them."""

    values: torch.Tensor
    fishers: torch.Tensor | None


def _uses_fishers(plan: MergePlan, task: TensorTask) -> bool:
    return task.rule == "method" and plan.fishers is not None


def _prefetch(plan: MergePlan, task: TensorTask, rows: slice) -> None:
    for checkpoint in plan.checkpoints + (plan.fishers if _uses_fishers(plan, task) else []):
        checkpoint.store.prefetch(task.name, rows)


def _read_block(plan: MergePlan, task: TensorTask, rows: slice, buffers: Workspace) -> _Block:
    # Runs on the reader thread, so the Fisher checks overlap with the arithmetic of the previous block too.
    values = _read_stacked([c.store for c in plan.checkpoints], task.name, rows, buffers, "values")
    if not _uses_fishers(plan, task):
        return _Block(values, None)
    fishers = _read_stacked([f.store for f in plan.fishers], task.name, rows, buffers, "fishers")
    _check_fishers(plan.fishers, task.name, fishers)
    for fisher, scale in zip(fishers, plan.fisher_scales):
        if scale != 1.0:  # without normalize every scale is 1: skipping it saves a pass over every Fisher
            fisher.mul_(scale)
    return _Block(values, fishers)


def _read_stacked(stores: Sequence[TensorSource], name: str, rows: slice, buffers: Workspace, key: str) -> torch.Tensor:
    infos = [store.info(name) for store in stores]
    dtype = functools.reduce(torch.promote_types, (info.dtype for info in infos))
    stacked = buffers.tensor(key, (len(stores), *block_shape(infos[0], rows)), dtype)
    for i, (store, info, row) in enumerate(zip(stores, infos, stacked)):
        if info.dtype == dtype:
            store.read(name, rows, out=row)
        else:  # inputs saved in different dtypes: read each as it is, then widen it into the common buffer
            row.copy_(store.read(name, rows, out=buffers.tensor((key, i), row.shape, info.dtype)))
    return stacked


def _merge_block(plan: MergePlan, task: TensorTask, block: _Block, workspace: Workspace) -> torch.Tensor:
    values = block.values
    if task.rule == "copy":
        for checkpoint, value in zip(plan.checkpoints[1:], values[1:]):
            if not torch.equal(value, values[0]):
                raise IncompatibleCheckpointsError(
                    f"{task.name} is not a float tensor and differs between {plan.checkpoints[0].path} and "
                    f"{checkpoint.path}, so it cannot be averaged: merge checkpoints that agree on it"
                )
        return values[0]
    if task.rule == "average":
        return kernels.weighted_average(values, plan.weights, workspace)
    return plan.method.kernel(values, block.fishers, plan.weights, plan.recipe.damping, workspace)


def _check_fishers(fishers: Sequence[FisherCheckpoint], name: str, stacked: torch.Tensor) -> None:
    # One screen covers every input's block; which input fails is looked for only when the screen fails.
    if not _passes_screen(stacked):
        for fisher, block in zip(fishers, stacked):
            _checked_fisher(fisher, name, block)


def _checked_fisher(fisher: FisherCheckpoint, name: str, block: torch.Tensor) -> torch.Tensor:
    if _passes_screen(block):
        return block
    if not bool(torch.isfinite(block).all()):
        raise FisherError(f"{fisher.path} has NaN or Inf values in {name}: re-estimate it (lower the learning rate "
                          "or use fp32 if the model diverged)")
    if bool((block < 0).any()):
        raise FisherError(f"{fisher.path} has negative values in {name}, which a Fisher cannot have: re-estimate it")
    return block


def _passes_screen(block: torch.Tensor) -> bool:
    # One reduction screens a block: min/max propagate NaN, and a finite max with min >= 0 means every value
    # is finite and non-negative. isfinite().all() plus (block < 0).any() cost ~20x more per element on a CPU
    # and dominated the merge; the precise checks run only for a block that fails the screen.
    if block.numel() == 0:
        return True
    low, high = torch.aminmax(block)
    return bool(low >= 0) and bool(high < math.inf)


def _render_card(plan: MergePlan, repo_id: str | None):
    from fishmerge.cards import render_merge_card

    return render_merge_card(merge_card_info(plan, repo_id))


def merge_card_info(plan: MergePlan, repo_id: str | None = None):
    """What the model card says about this merge: method, inputs, weights and the Fishers' provenance."""
    from fishmerge.cards import FisherProvenance, MergeCardInfo, MergeInput

    inputs = []
    for i, checkpoint in enumerate(plan.checkpoints):
        fisher = plan.fishers[i] if plan.fishers else None
        provenance = FisherProvenance.from_metadata(fisher.path, fisher.metadata) if fisher else None
        inputs.append(MergeInput(str(checkpoint.path), plan.weights[i], provenance,
                                 license=_card_license(checkpoint.path), base_model=checkpoint.base_model))
    datasets = tuple(dict.fromkeys(i.fisher.data for i in inputs if i.fisher and i.fisher.data))
    return MergeCardInfo(
        method=plan.method.name,
        method_description=plan.method.description,
        citations=plan.method.citations,
        inputs=tuple(inputs),
        recipe_yaml=plan.recipe.to_yaml(),
        library_name="peft" if plan.kind == "adapter" else "transformers",
        datasets=datasets,
        repo_id=repo_id,
    )


def _card_license(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a hand-written README without valid metadata says nothing about the license
        return None


def merge(recipe: MergeRecipe | Mapping | str | Path, out: Path, *, overwrite: bool = False,
          repo_id: str | None = None) -> Path:
    """Merge the checkpoints of ``recipe`` into ``out``: :func:`plan_merge` then :func:`execute_merge`."""
    return execute_merge(plan_merge(recipe), Path(out), overwrite=overwrite, repo_id=repo_id)
