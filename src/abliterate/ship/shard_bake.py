"""Shard-wise bake: an ablation baked into a safetensors checkpoint tensor by tensor, without loading the model.

    for each shard of the base checkpoint (same file names, same header, same offsets: the layout is kept):
        header, and every tensor the plan does not touch  →  copied byte for byte (in the kernel where it can)
        tensor t the plan touches                          →  t' = edited_tensor(t, u, w, axis, norm-preserving),
                                                               the very function and (u, w) of the in-memory `bake`
    index, config, tokenizer, generation config, chat template  →  copied;  abliteration.json added

So the output equals `load_model` + `bake` + `save_hf` bit for bit, tensor for tensor. Which tensors and with what
comes from the in-memory planner itself: `plan_edits` and `tensor_edits` run on the model's skeleton (built from
config.json on the meta device, no weights) whose 1-D tensors — norms and biases, where Gemma-style post-norm
scales come from — are read from the checkpoint. Memory: the skeleton, then one tensor at a time (its float32
working copies while edited). Output goes to `<out>.partial`, renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch

from abliterate.core.arch import adapter_for, family_for
from abliterate.core.load import resolve
from abliterate.core.safetensors_file import (DTYPE_NAMES, FLOAT_DTYPES, Layout, copy_range, read_layout, read_tensor,
                                              write_tensor)
from abliterate.core.save import check_output_dir
from abliterate.errors import UserError
from abliterate.measure.ablation import AblationParams, TensorEdit, edited_tensor, plan_edits, tensor_edits
from abliterate.measure.directions import Directions

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weights in other formats (and Meta's `original/` folder) are not copied: the output holds the edited safetensors only.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
_NOT_COPIED = {INDEX_FILE, "README.md", "abliteration.json"}  # the base model's card would misdescribe the edit


class NotShardable(UserError):
    """This checkpoint cannot be edited shard-wise (stored names, dtypes or quantisation differ from the model's);
    `apply` then loads the model instead."""


@dataclass
class Checkpoint:
    """A safetensors checkpoint on disk: `weight_map` names each tensor's shard file."""

    reference: str
    revision: str | None
    folder: Path
    config: object  # the model's transformers config
    weight_map: dict[str, str]
    has_index: bool

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


@dataclass
class ShardPlan:
    checkpoint: Checkpoint
    model_type: str
    edit_count: int  # component edits, as `plan_edits` counts them
    layouts: dict[str, Layout]  # shard file → its header
    operations: dict[str, list[TensorEdit]] = field(default_factory=dict)  # tensor name → edits, in `bake`'s order


@dataclass
class ShardStep:
    """Where the bake is, for progress: shard `index` (0-based) of `count` starts now."""

    index: int
    count: int
    name: str
    elapsed_s: float
    eta_s: float | None  # by bytes done so far; None before the first shard finishes

    def describe(self) -> str:
        eta = "" if self.eta_s is None else f", ETA {self.eta_s:.0f} s"
        return f"baking {self.name} ({self.index + 1}/{self.count}{eta})"


def _snapshot_folder(reference: str, revision: str | None) -> Path | None:
    """The hub id's snapshot in the local HF cache (never the network); None if it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(reference, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _weight_map(folder: Path) -> tuple[dict[str, str], bool] | None:
    """Tensor name → shard file, and whether an index lists them; None without (complete) safetensors weights."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{index} is not a safetensors index ({error})") from None
        if not all((folder / shard).is_file() for shard in weight_map.values()):
            return None  # a partial download
        return weight_map, True
    if (folder / SINGLE_FILE).is_file():
        return {name: SINGLE_FILE for name in read_layout(folder / SINGLE_FILE).entries}, False
    return None


def _model_folder(reference: str, revision: str | None) -> Path | None:
    source = resolve(reference, revision)
    if source.gguf_file:
        return None
    return Path(source.path) if source.is_local else _snapshot_folder(reference, revision)


def find_checkpoint(reference: str, revision: str | None = None, trust_remote_code: bool = False) -> Checkpoint | None:
    """The safetensors checkpoint of a model folder, the bundled alias, or a hub id complete in the local HF cache;
    None where there is none (a GGUF, other weight formats, not downloaded). Unsupported architecture → UserError."""
    from transformers import AutoConfig

    folder = _model_folder(reference, revision)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"could not read the model config in {folder} ({str(error).splitlines()[0]})") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    family_for(text_config.model_type)  # unsupported architecture: one line, before any weights are looked at
    found = _weight_map(folder)
    return None if found is None else Checkpoint(reference, revision, folder, config, *found)


def open_checkpoint(reference: str, revision: str | None = None, trust_remote_code: bool = False) -> Checkpoint:
    """`find_checkpoint`, or one line saying why there is none."""
    checkpoint = find_checkpoint(reference, revision, trust_remote_code)
    if checkpoint is None:
        raise UserError(f"{reference} has no safetensors checkpoint on disk (model.safetensors or {INDEX_FILE}, "
                        "complete); shard-wise bake reads a model folder or a hub id in the local cache")
    return checkpoint


def _skeleton(checkpoint: Checkpoint, trust_remote_code: bool):
    if getattr(checkpoint.config, "quantization_config", None):
        raise NotShardable(f"{checkpoint.reference} is quantized; shard-wise bake edits float weights only")
    return skeleton(checkpoint.config, checkpoint.reference, trust_remote_code)


def skeleton(config, reference: str, trust_remote_code: bool = False):
    """The model without weights (meta device), from its config alone: module names and shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise NotShardable(f"{reference} is not a plain causal LM (its stored names differ from the model's); "
                           "a tensor-by-tensor edit does not map them")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # as loading would (from_config leaves a meta model untied in transformers 5.25)
    return model


def _stored_name(name: str, weight_map: dict[str, str], base_prefix: str) -> str | None:
    """The checkpoint's name of a model parameter: the same, or without the base-model prefix (old GPT-2 files)."""
    for candidate in (name, name.removeprefix(base_prefix + ".")):
        if candidate in weight_map:
            return candidate
    return None


def _read_vectors(model, checkpoint: Checkpoint, layouts: dict[str, Layout]) -> None:
    """Replace the skeleton's 1-D parameters (norm weights, biases) with the checkpoint's: the adapter reads the
    post-norm scales g of Gemma-style layers from them. A few hundred small reads."""
    wanted: dict[str, list[tuple[str, str]]] = {}
    for name, param in model.named_parameters():
        stored = _stored_name(name, checkpoint.weight_map, model.base_model_prefix)
        if param.ndim == 1 and stored is not None:
            wanted.setdefault(checkpoint.weight_map[stored], []).append((name, stored))
    for shard, names in wanted.items():
        with open(checkpoint.folder / shard, "rb", buffering=0) as handle:
            for name, stored in names:
                module_path, _, leaf = name.rpartition(".")
                tensor = read_tensor(handle, layouts[shard].entries[stored])
                setattr(model.get_submodule(module_path), leaf, torch.nn.Parameter(tensor, requires_grad=False))


def _check_stored(name: str, operation: TensorEdit, layout: Layout, config) -> None:
    """The stored tensor is what loading would hold: same shape, a float type, and the config's dtype where it names
    one (loading "as stored" converts to the config's dtype: the in-memory bake would then edit another dtype)."""
    entry = layout.entries[name]
    config_dtype = getattr(config, "dtype", None)
    expected = DTYPE_NAMES.get(config_dtype, entry.dtype) if isinstance(config_dtype, torch.dtype) else entry.dtype
    if entry.dtype not in FLOAT_DTYPES or entry.dtype != expected or entry.shape != tuple(operation.parameter.shape):
        raise NotShardable(f"tensor {name} is stored as {entry.dtype} {list(entry.shape)}, the model loads it as "
                           f"{expected} {list(operation.parameter.shape)}; shard-wise bake edits tensors as stored")


def plan_shard_edits(checkpoint: Checkpoint, refusal: Directions, params: AblationParams,
                     trust_remote_code: bool = False) -> ShardPlan:
    """Which stored tensors change and how: `plan_edits` + `tensor_edits` on the skeleton, names mapped to the files."""
    model = _skeleton(checkpoint, trust_remote_code)
    layouts = {shard: read_layout(checkpoint.folder / shard) for shard in checkpoint.shards}
    _read_vectors(model, checkpoint, layouts)
    adapter = adapter_for(model)
    for component in adapter.components:
        if component.post_norm_scale is not None and component.post_norm_scale.is_meta:
            raise NotShardable(f"the post-norm weights of layer {component.layer} are not in the checkpoint under "
                               "the model's names")
    edits = plan_edits(adapter, refusal.fitted_to(adapter).directions, params)
    names = {id(param): name for name, param in model.named_parameters(remove_duplicate=False)}
    plan = ShardPlan(checkpoint, adapter.model_type, len(edits), layouts)
    for operation in tensor_edits(edits, params.norm_preserving):
        stored = _stored_name(names[id(operation.parameter)], checkpoint.weight_map, model.base_model_prefix)
        if stored is None:
            raise NotShardable(f"{names[id(operation.parameter)]} is not in the checkpoint under that name "
                               "(transformers renames this model's weights when loading); shard-wise bake cannot map it")
        _check_stored(stored, operation, layouts[checkpoint.weight_map[stored]], checkpoint.config)
        plan.operations.setdefault(stored, []).append(operation)
    return plan


@torch.no_grad()
def _bake_shard(source: Path, target: Path, layout: Layout, operations: dict[str, list[TensorEdit]]) -> None:
    """Copy `source` to `target` byte for byte except the tensors in `operations`, which are edited in between."""
    with open(source, "rb", buffering=0) as inp, open(target, "wb", buffering=0) as out:
        position = 0  # everything before it has been written
        for entry in layout.in_file_order():
            if entry.name not in operations:
                continue
            copy_range(inp, out, position, entry.begin - position)  # header / untouched tensors before this one
            tensor = read_tensor(inp, entry)
            for op in operations[entry.name]:
                tensor = edited_tensor(tensor, op.u, op.strength, op.hidden_axis, op.norm_preserving)
            write_tensor(out, tensor)  # same dtype and shape: exactly entry.end - entry.begin bytes
            position = entry.end
            del tensor
        copy_range(inp, out, position, source.stat().st_size - position)


def _copy_side_files(folder: Path, target: Path) -> None:
    """Config, tokenizer, generation config, chat template, licence, remote code: every top-level file that is
    not weights (hub-cache symlinks are followed)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(path, target / path.name)


def _check_space(checkpoint: Checkpoint, out: Path) -> None:
    needed = sum((checkpoint.folder / shard).stat().st_size for shard in checkpoint.shards)
    parent = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < needed * 1.01:
        raise UserError(f"the baked model needs {needed / 1e9:.1f} GB but {parent} has {free / 1e9:.1f} GB free")


def write_baked(plan: ShardPlan, output: str | Path, extra_files: dict[str, str | dict] | None = None,
                on_shard: Callable[[ShardStep], ContextManager] | None = None) -> Path:
    """Write the baked checkpoint to `output` (a new folder), each shard inside `on_shard(step)` if given."""
    checkpoint, out = plan.checkpoint, check_output_dir(output)
    _check_space(checkpoint, out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    sizes = {shard: (checkpoint.folder / shard).stat().st_size for shard in checkpoint.shards}
    start, done = time.perf_counter(), 0
    try:
        partial.mkdir(parents=True)
        _copy_side_files(checkpoint.folder, partial)
        for index, shard in enumerate(checkpoint.shards):
            elapsed = time.perf_counter() - start
            eta = elapsed * (sum(sizes.values()) - done) / done if done else None  # bytes left at the rate so far
            step = ShardStep(index, len(sizes), shard, elapsed, eta)
            operations = {name: ops for name, ops in plan.operations.items() if checkpoint.weight_map[name] == shard}
            with on_shard(step) if on_shard else contextlib.nullcontext():
                _bake_shard(checkpoint.folder / shard, partial / shard, plan.layouts[shard], operations)
            done += sizes[shard]
        if checkpoint.has_index:
            shutil.copyfile(checkpoint.folder / INDEX_FILE, partial / INDEX_FILE)  # same names, files and sizes
        for name, content in (extra_files or {}).items():
            (partial / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def shard_bake(reference: str, refusal: Directions, params: AblationParams, output: str | Path,
               revision: str | None = None, extra_files: dict[str, str | dict] | None = None,
               on_shard: Callable[[ShardStep], ContextManager] | None = None,
               trust_remote_code: bool = False) -> ShardPlan:
    """Bake `params` with `refusal` into the safetensors checkpoint `reference` and write it to `output`."""
    check_output_dir(output)
    plan = plan_shard_edits(open_checkpoint(reference, revision, trust_remote_code), refusal, params, trust_remote_code)
    write_baked(plan, output, extra_files, on_shard)
    return plan
