"""GGUF in → GGUF out: bake an ablation into a GGUF file without leaving the format.

The edit itself is the dense one (`ablation.bake` on the weights transformers dequantised from the file), so a GGUF
edit equals the HF edit by construction. Only the tensors the edit changed are re-encoded:

    tensor t edited  →  quantize(dense edited t, type of t)     (or the nearest type the `gguf` library can encode
                                                                 without losing precision, reported)
    every other tensor, and all metadata  →  copied byte for byte

Names map from transformers to GGUF through the `gguf` library's own tensor-name tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from abliterate.errors import UserError

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
    import gguf

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
            data, qtype = replacements.get(tensor.name, (tensor.data, tensor.tensor_type))
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data, _ = replacements.get(tensor.name, (tensor.data, None))
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
        partial.replace(out_file)
    finally:
        partial.unlink(missing_ok=True)
    return report


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
