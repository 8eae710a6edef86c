"""Architecture adapters: the one place that knows where each model family writes into the residual stream.

A decoder layer adds two things to the residual stream: the attention output and the MLP output.
Abliteration edits the modules that produce them ("writers"): the attention output projection, the MLP
down projection — for mixture-of-experts blocks every expert's down projection (also transformers-5 fused
3-D expert parameters) and any shared expert. Some families (Gemma 2/3, OLMo 2) pass that output through
a norm with weight g before the residual add; the adapter reports g so the edit can stay exact.

To support a new family, add one `Family` row to `FAMILIES`. Nothing else in the code base names a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from abliterate.errors import UserError


@dataclass(frozen=True)
class Family:
    """Where a family's residual writers live, as attribute paths relative to a decoder layer."""

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"  # path of the decoder-layer list from the causal-LM object
    attention_out: str = "self_attn.o_proj"  # the module whose output the attention block adds
    mlp: str = "mlp"  # the MLP (or MoE) block; its output is what the layer adds
    mlp_out_names: tuple[str, ...] = ("down_proj",)  # down projections anywhere inside the MLP block
    attention_post_norm: str | None = None  # norm between attention output and residual add
    mlp_post_norm: str | None = None
    post_norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)
    # Layer j's input depends only on layer j-1's output (no other state passed between layers), so trials may
    # start from the base model's stream at their first edited layer (prefix.py). False: always the full forward.
    prefix_reuse: bool = True


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama-like",
        (
            "llama", "mistral", "ministral", "qwen2", "qwen3", "phi3", "granite", "olmo", "cohere", "cohere2",
            "glm", "glm4", "helium", "exaone4", "smollm3", "seed_oss", "arcee", "apertus", "hunyuan_v1_dense",
            "qwen2_moe", "qwen3_moe", "mixtral", "phimoe", "gpt_oss", "granitemoe", "granitemoeshared", "olmoe",
            "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5", "ernie4_5_moe", "hunyuan_v1_moe", "minimax",
            "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text", "mistral3", "llava",
        ),
    ),
    Family(
        "gemma",
        ("gemma2", "gemma3_text", "gemma3"),
        attention_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
        post_norm_offset=1.0,
    ),
    Family("gemma1", ("gemma",)),
    Family(
        "olmo2",
        ("olmo2", "olmo3"),
        attention_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm",
    ),
    Family("gpt2", ("gpt2",), layers="transformer.h", attention_out="attn.c_proj", mlp_out_names=("c_proj",)),
    Family(
        "gpt_neox", ("gpt_neox",), layers="gpt_neox.layers", attention_out="attention.dense",
        mlp_out_names=("dense_4h_to_h",),
    ),
    Family("phi", ("phi",), attention_out="self_attn.dense", mlp_out_names=("fc2",)),
    Family(
        "falcon", ("falcon",), layers="transformer.h", attention_out="self_attention.dense",
        mlp_out_names=("dense_4h_to_h",),
    ),
)

# Vision-language models keep the text tower under a prefix; the layer path is tried under each.
_TEXT_TOWER_PREFIXES = ("", "model.language_model.", "language_model.", "model.text_model.")


def supported_model_types() -> list[str]:
    return sorted({t for family in FAMILIES for t in family.model_types})


@dataclass
class Writer:
    """One weight tensor whose output is added to the residual stream (possibly through a post-norm).

    `hidden_axis` is the weight axis that indexes the residual (hidden) dimension: -2 for nn.Linear
    ([out, in]) and fused experts [E, hidden, in]; -1 for GPT-2 Conv1D ([in, out]) and transposed
    fused experts [E, in, hidden].
    """

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    hidden_axis: int

    @property
    def weight_param(self) -> nn.Parameter:
        return getattr(self.module, self.weight)

    @property
    def bias_param(self) -> nn.Parameter | None:
        return getattr(self.module, self.bias) if self.bias else None


@dataclass
class Component:
    """What one component ("attn" or "mlp") of one layer writes into the residual stream."""

    kind: str
    layer: int
    output_module: nn.Module  # its forward output is the sum of the writers' outputs, before any post-norm
    writers: list[Writer]
    post_norm_scale: torch.Tensor | None = None  # g such that the residual receives g ⊙ normalize(output)


@dataclass
class Adapter:
    family: Family
    model_type: str
    layers: nn.ModuleList
    hidden_size: int
    components: list[Component] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def component(self, kind: str, layer: int) -> Component:
        for candidate in self.components:
            if candidate.kind == kind and candidate.layer == layer:
                return candidate
        raise KeyError((kind, layer))


COMPONENT_KINDS = ("attn", "mlp")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def family_for(model_type: str) -> Family:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UserError(
        f"architecture '{model_type}' is not supported (abliterate edits transformer decoder layers); "
        f"supported model types: {', '.join(supported_model_types())}"
    )


def _get(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _find_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    for prefix in _TEXT_TOWER_PREFIXES:
        for path in (prefix + family.layers, prefix + family.layers.removeprefix("model.")):
            try:
                layers = _get(model, path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise UserError(f"could not find the decoder layers of this {family.name} model; is it a causal LM?")


def _module_writer(name: str, module: nn.Module) -> Writer:
    # GPT-2's Conv1D stores [in, out]; every other writer is an nn.Linear storing [out, in].
    hidden_axis = -1 if type(module).__name__ == "Conv1D" else -2
    bias = "bias" if getattr(module, "bias", None) is not None else None
    return Writer(name, module, "weight", bias, hidden_axis)


def _mlp_writers(mlp: nn.Module, prefix: str, family: Family, hidden_size: int) -> list[Writer]:
    writers = []
    for local_name, module in mlp.named_modules():
        full = f"{prefix}.{local_name}" if local_name else prefix
        last = local_name.rsplit(".", 1)[-1]
        if last in family.mlp_out_names and hasattr(module, "weight") and module.weight.ndim == 2:
            writers.append(_module_writer(full, module))
            continue
        for param_name in family.mlp_out_names:
            fused = module._parameters.get(param_name)
            if fused is None or fused.ndim != 3:
                continue
            # Fused experts [E, hidden, in] or, where the class says it is transposed, [E, in, hidden].
            transposed = getattr(module, "is_transposed", fused.shape[-2] != hidden_size)
            bias = f"{param_name}_bias" if module._parameters.get(f"{param_name}_bias") is not None else None
            writers.append(Writer(f"{full}.{param_name}", module, param_name, bias, -1 if transposed else -2))
    return writers


def _post_norm_scale(layer: nn.Module, name: str | None, offset: float) -> torch.Tensor | None:
    if name is None:
        return None
    norm = getattr(layer, name)
    return norm.weight.detach().float() + offset


def adapter_for(model: nn.Module) -> Adapter:
    """Describe every residual writer of `model`, layer by layer. Raises UserError if unsupported."""
    text_config = _text_config(model.config)
    model_type = text_config.model_type
    family = family_for(model_type)
    layers = _find_layers(model, family)
    hidden_size = text_config.hidden_size
    adapter = Adapter(family, model_type, layers, hidden_size)
    for index, layer in enumerate(layers):
        prefix = f"layers.{index}"
        attention_out = _get(layer, family.attention_out)
        adapter.components.append(
            Component(
                "attn", index, attention_out,
                [_module_writer(f"{prefix}.{family.attention_out}", attention_out)],
                _post_norm_scale(layer, family.attention_post_norm, family.post_norm_offset),
            )
        )
        mlp = _get(layer, family.mlp)
        writers = _mlp_writers(mlp, f"{prefix}.{family.mlp}", family, hidden_size)
        if not writers:
            raise UserError(
                f"found no MLP output projection in layer {index} of this {model_type} model "
                f"(looked for {', '.join(family.mlp_out_names)}); please report this architecture"
            )
        adapter.components.append(
            Component("mlp", index, mlp, writers,
                      _post_norm_scale(layer, family.mlp_post_norm, family.post_norm_offset))
        )
    return adapter
