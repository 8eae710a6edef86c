"""GGUF in → GGUF out: bake an ablation into a GGUF file without leaving the format, tensor by tensor.

    plan       `plan_edits` + `tensor_edits` on the model's skeleton (config read from the GGUF, meta device, its
               1-D norm weights read from the file): which tensors change, with which u and strength
    tensor t the plan touches  →  quantize(edited_tensor(dequantize(t), u, w, ...), type of t)
                                  (or the nearest type the `gguf` library can encode without losing precision, reported)
    every other tensor, and all metadata  →  copied byte for byte

`edited_tensor` is the function the in-memory `bake` calls, on the weights transformers would dequantise (the same
`gguf` dequantisation, the same per-architecture tensor processing), so the file equals the one the dense path
writes (load, bake, re-encode), byte for byte; memory is one tensor at a time instead of the whole model in float32.
Names map between transformers and GGUF through transformers' own GGUF name map. An architecture whose edited
tensors transformers reshapes beyond a transpose (fused experts) is edited by the dense path (`write_edited_gguf`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from abliterate.errors import UserError
from abliterate.measure.ablation import AblationParams, TensorEdit, edited_tensor, plan_edits, tensor_edits
from abliterate.ship.shard_bake import NotShardable, skeleton

# K-quants and i-quants cannot be encoded by the `gguf` library; re-encode to a type with no more error.
NEAREST_ENCODABLE = {
    "Q2_K": "Q4_1", "Q3_K": "Q4_1", "Q4_K": "Q5_0", "Q5_K": "Q8_0", "Q6_K": "Q8_0",
    "IQ1_S": "Q4_1", "IQ1_M": "Q4_1", "IQ2_XXS": "Q4_1", "IQ2_XS": "Q4_1", "IQ2_S": "Q4_1", "IQ3_XXS": "Q4_1",
    "IQ3_S": "Q4_1", "IQ4_NL": "Q5_0", "IQ4_XS": "Q5_0",
}
ENCODABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@dataclass
class GGUFEdit:
    tensors_edited: int = 0
    retyped: dict[str, tuple[str, str]] = field(default_factory=dict)  # tensor name → (original type, written type)


def encodable_type(type_name: str) -> str:
    if type_name in ENCODABLE:
        return type_name
    if type_name in NEAREST_ENCODABLE:
        return NEAREST_ENCODABLE[type_name]
    raise UserError(f"GGUF tensors of type {type_name} cannot be re-encoded; export from an HF directory instead")


def _hf_to_gguf_names(model, arch_name: str, n_blocks: int) -> dict[int, str]:
    """id(parameter) → GGUF tensor name, for every parameter the gguf tables know."""
    import gguf

    archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch_name not in archs:
        raise UserError(f"GGUF architecture '{arch_name}' is not known to the gguf library; cannot edit this file")
    table = gguf.get_tensor_name_map(archs[arch_name], n_blocks)
    names = {}
    for name, param in model.named_parameters():
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None and ".language_model." in name:  # VLM text towers: try the text model's own names
            mapped = table.get_name(name.replace(".language_model.", "."), try_suffixes=(".weight", ".bias"))
        if mapped is not None:
            names[id(param)] = mapped
    return names


def _encode(dense: np.ndarray, type_name: str):
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return dense.astype(np.float32), qtype
    if type_name == "F16":
        return dense.astype(np.float16), qtype
    return gguf.quants.quantize(dense.astype(np.float32), qtype), qtype


def write_edited_gguf(source: str | Path, out_file: str | Path, model, edited_params: list[torch.nn.Parameter]) -> GGUFEdit:
    """Copy `source` to `out_file` with the tensors of `edited_params` (already edited in `model`) re-encoded."""

    from abliterate.core.gguf_reader import GGUFReader

    source, out_file = Path(source), Path(out_file)
    reader = GGUFReader(source)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    n_blocks = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    names = _hf_to_gguf_names(model, arch, n_blocks)
    tensors = {t.name: t for t in reader.tensors}
    replacements: dict[str, tuple[np.ndarray, object]] = {}
    report = GGUFEdit()
    for param in edited_params:
        name = names.get(id(param))
        if name is None or name not in tensors:
            raise UserError(f"cannot find the GGUF tensor of an edited weight ({tuple(param.shape)}) in {source.name}; "
                            "this architecture's GGUF editing is not supported: export from an HF directory instead")
        original = tensors[name]
        dense = param.detach().float().cpu().numpy()
        shape = tuple(int(n) for n in reversed(original.shape))  # GGUF lists dimensions fastest first
        if dense.shape != shape:
            if dense.ndim == 2 and dense.T.shape == shape:
                dense = dense.T  # GPT-2 Conv1D: transformers keeps [in, out]
            else:
                raise UserError(f"edited weight {name} has shape {dense.shape}, the GGUF tensor {shape}")
        dense = np.ascontiguousarray(dense)
        type_name = original.tensor_type.name
        written = encodable_type(type_name)
        data, qtype = _encode(dense, written)
        if written != type_name:
            report.retyped[name] = (type_name, written)
        replacements[name] = (data, qtype)
    report.tensors_edited = len(replacements)
    infos = {name: (data.shape, data.dtype, data.nbytes, qtype) for name, (data, qtype) in replacements.items()}
    _write(reader, arch, out_file, infos, lambda tensor: replacements[tensor.name][0])
    return report


def _write(reader, arch: str, out_file: Path, infos: dict, produce: Callable) -> None:
    """`out_file` (through `.partial`): the reader's metadata and tensors, those named in `infos` (stored shape, dtype,
    bytes, type) replaced by what `produce(tensor)` returns when their turn comes: one replacement in memory at once."""
    import gguf

    partial = out_file.with_name(out_file.name + ".partial")
    try:
        writer = gguf.GGUFWriter(partial, arch=arch, endianess=reader.endianess)
        alignment = reader.fields.get("general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment.parts[-1][0])
        for item in reader.fields.values():
            if item.name == gguf.Keys.General.ARCHITECTURE or item.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself / virtual
            value_type = item.types[0]
            sub_type = item.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(item.name, item.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            shape, dtype, nbytes, qtype = infos.get(tensor.name, (tensor.data.shape, tensor.data.dtype,
                                                                  tensor.data.nbytes, tensor.tensor_type))
            writer.add_tensor_info(tensor.name, shape, dtype, nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data = produce(tensor) if tensor.name in infos else tensor.data
            if tensor.name in infos and data.nbytes != infos[tensor.name][2]:
                raise RuntimeError(f"{tensor.name}: encoded to {data.nbytes} bytes, planned {infos[tensor.name][2]}")
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        partial.replace(out_file)
    finally:
        partial.unlink(missing_ok=True)


def edited_parameters(edits) -> list[torch.nn.Parameter]:
    """The parameters a list of edits changes (weights and biases of every writer), each once."""
    seen, params = set(), []
    for edit in edits:
        for writer in edit.component.writers:
            for param in (writer.weight_param, writer.bias_param):
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
    return params


# --- tensor by tensor, without loading the model ---------------------------------------------------------------


class NotStreamable(NotShardable):
    """This GGUF cannot be edited tensor by tensor (see the module docstring); the dense path can."""


@dataclass
class GGUFPlan:
    source: Path
    reader: object
    arch: str
    model_type: str
    edit_count: int  # component edits, as `plan_edits` counts them
    operations: dict[str, list[TensorEdit]] = field(default_factory=dict)  # GGUF tensor name → edits, `bake`'s order
    processor: object = None  # transformers' tensor processor of this architecture
    names: dict[str, str] = field(default_factory=dict)  # GGUF tensor name → transformers parameter name


def _as_loaded(plan: GGUFPlan, tensor) -> np.ndarray:
    """A GGUF tensor as transformers loads it: dequantised, then its architecture's processing (float32)."""
    from gguf import dequantize

    weights = dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(plan.processor.process(weights=weights, name=tensor.name, tensor_key_mapping=plan.names,
                                             parsed_parameters={"config": {}, "tensors": {}}).weights, dtype=np.float32)


def plan_gguf_edit(gguf_file: str | Path, refusal, params: AblationParams, trust_remote_code: bool = False) -> GGUFPlan:
    """Which GGUF tensors change and how, from the file's config and 1-D tensors alone."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from abliterate.core.arch import adapter_for
    from abliterate.core.gguf_reader import GGUFReader

    gguf_file = Path(gguf_file)
    reader = GGUFReader(gguf_file)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = skeleton(config, gguf_file.name, trust_remote_code)
    plan = GGUFPlan(gguf_file, reader, arch, config.model_type, 0,
                    processor=TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict()))
    try:
        plan.names = get_gguf_hf_weights_map(model, plan.processor)
    except NotImplementedError as error:
        raise NotStreamable(f"{gguf_file.name}: {error}") from None
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    gguf_names = {hf: name for name, hf in plan.names.items() if name in tensors}
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for hf_name, name in gguf_names.items():  # norms and biases: the adapter reads Gemma-style post-norm scales
        if hf_name in parameters and parameters[hf_name].ndim == 1:
            module_path, _, leaf = hf_name.rpartition(".")
            value = torch.from_numpy(_as_loaded(plan, tensors[name]).reshape(parameters[hf_name].shape))
            setattr(model.get_submodule(module_path), leaf, torch.nn.Parameter(value, requires_grad=False))
    adapter = adapter_for(model)
    edits = plan_edits(adapter, refusal.fitted_to(adapter).directions, params)
    plan.edit_count = len(edits)
    hf_names = {id(param): name for name, param in parameters.items()}
    for operation in tensor_edits(edits, params.norm_preserving):
        name = gguf_names.get(hf_names[id(operation.parameter)])
        if name is None:
            raise NotStreamable(f"{hf_names[id(operation.parameter)]} has no tensor of its own in {gguf_file.name}")
        plan.operations.setdefault(name, []).append(operation)
    return plan


def _edited_array(plan: GGUFPlan, tensor, operations: list[TensorEdit]) -> np.ndarray:
    """The tensor edited in transformers' orientation, returned in the file's."""
    loaded = _as_loaded(plan, tensor)
    shape = tuple(operations[0].parameter.shape)
    stored = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest first
    transposed = loaded.shape != shape and loaded.ndim == 2 and loaded.T.shape == shape
    if loaded.shape != shape and not transposed or loaded.size != int(np.prod(stored)):
        raise NotStreamable(f"{tensor.name} loads as {loaded.shape}, the model holds {shape}")
    edited = torch.from_numpy(np.ascontiguousarray(loaded.T if transposed else loaded))
    for op in operations:
        edited = edited_tensor(edited, op.u, op.strength, op.hidden_axis, op.norm_preserving)
    edited = edited.numpy()
    return np.ascontiguousarray((edited.T if transposed else edited).reshape(stored))


def edit_gguf(plan: GGUFPlan, out_file: str | Path) -> GGUFEdit:
    """Write `out_file`: the plan's tensors edited and re-encoded one at a time, everything else copied."""
    import gguf

    report, infos = GGUFEdit(tensors_edited=len(plan.operations)), {}
    for tensor in plan.reader.tensors:
        if tensor.name not in plan.operations:
            continue
        type_name = tensor.tensor_type.name
        written = encodable_type(type_name)
        if written != type_name:
            report.retyped[tensor.name] = (type_name, written)
        qtype = gguf.GGMLQuantizationType[written]
        shape = tuple(int(n) for n in reversed(tensor.shape))
        plain = {"F32": np.float32, "F16": np.float16}.get(written)
        stored = shape if plain else gguf.quant_shape_to_byte_shape(shape, qtype)
        dtype = np.dtype(plain or np.uint8)
        infos[tensor.name] = (stored, dtype, int(np.prod(stored)) * dtype.itemsize, qtype)
    _write(plan.reader, plan.arch, Path(out_file), infos,
           lambda tensor: _encode(_edited_array(plan, tensor, plan.operations[tensor.name]), infos[tensor.name][3].name)[0])
    return report
