"""Memory a model needs, from its config.json alone (no weights, no torch): parameters counted per part, KV cache,
overhead; and the plan before loading (`plan_load`): does it fit this machine (RAM, GPU memory, or `max_memory`), and
if not, what would (4-bit, offload, a GPU of N GB).

Memory sizes are binary, as RAM and VRAM are sold: "16GB" = 16 GiB = 16 x 2^30 bytes. `choose/catalog.py` (the model
catalog, GGUF quants) builds on this.
"""

from __future__ import annotations

import os
import re

from abliterate.errors import UserError

GIB = 1 << 30
DEFAULT_CONTEXT = 8192
RAM_USABLE_FRACTION = 0.75
OVERHEAD_FIXED = GIB // 2
OVERHEAD_FRACTION = 0.05
HOST_RAM_WITH_GPU = GIB
DTYPE_BYTES = {"float32": 4, "fp32": 4, "f32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "f16": 2}

# ----------------------------------------------------------------------------------------- memory sizes

_UNIT_BITS = {"m": 20, "mb": 20, "mib": 20, "g": 30, "gb": 30, "gib": 30, "t": 40, "tb": 40, "tib": 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_memory(text: str) -> int:
    """'16GB', '16 GiB', '16g', '512MB', '1.5TB' → bytes (binary units: GB = GiB = 2^30). Else UserError."""
    match = _MEMORY.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNIT_BITS:
        raise UserError(f"unknown memory size '{text}'; give a number and a unit: MB, GB or TB "
                        "(also MiB/GiB/TiB or M/G/T, binary), e.g. 16GB")
    value = int(float(match.group(1)) * (1 << _UNIT_BITS[unit]))
    if value <= 0:
        raise UserError(f"memory size must be positive, got '{text}'")
    return value


def format_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


# ----------------------------------------------------------------------------------------- config → sizes


def text_config(config: dict) -> dict:
    """The language model's config: `text_config` of a vision-language model (tying inherited), else itself."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    merged = dict(text)
    if "tie_word_embeddings" not in merged and "tie_word_embeddings" in config:
        merged["tie_word_embeddings"] = config["tie_word_embeddings"]
    return merged


def first_key(config: dict, *keys, default=None):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def _dims(c: dict) -> tuple[int, int, int, int]:
    """hidden size, layers, attention heads, head_dim."""
    hidden = first_key(c, "hidden_size", "n_embd", "d_model")
    layers = first_key(c, "num_hidden_layers", "n_layer", "num_layers")
    heads = first_key(c, "num_attention_heads", "n_head")
    if hidden is None or layers is None or heads is None:
        raise UserError("config lacks hidden_size, num_hidden_layers or num_attention_heads; cannot estimate")
    heads = max(heads) if isinstance(heads, list) else heads
    return hidden, layers, heads, c.get("head_dim") or hidden // heads


def kv_heads(c: dict) -> int | list[int]:
    """KV heads (GQA/MQA); a list when they differ per layer (some GGUFs)."""
    model_type = c.get("model_type", "")
    heads = first_key(c, "num_attention_heads", "n_head")
    if model_type in ("gpt2", "gpt_neox"):
        return heads
    if model_type == "falcon":
        if c.get("new_decoder_architecture"):
            return first_key(c, "num_kv_heads", "num_key_value_heads", default=heads)
        return 1 if c.get("multi_query", True) else heads
    return first_key(c, "num_key_value_heads", "num_kv_heads", default=heads)


def _tied(c: dict) -> bool:
    default = c.get("model_type") in ("gemma", "gemma2", "gemma3_text", "gpt2", "falcon")
    return bool(c.get("tie_word_embeddings", default))


_QWEN2_QKV_BIAS = ("qwen2", "qwen2_moe", "qwen2_vl_text", "qwen2_5_vl_text")
_QK_NORM_HEAD = ("qwen3", "qwen3_moe", "qwen3_vl_text", "qwen3_vl_moe_text", "gemma3_text")
_QK_NORM_FULL = ("olmo2", "olmo3", "olmoe")


def _llama_like(c: dict) -> dict[str, int]:
    model_type = c.get("model_type", "")
    hidden, layers, heads, head_dim = _dims(c)
    kv = kv_heads(c)
    kv = max(kv) if isinstance(kv, list) else kv
    vocab = c["vocab_size"]
    inter = c.get("intermediate_size") or 4 * hidden
    out = dict(embeddings=vocab * hidden, lm_head=0 if _tied(c) else vocab * hidden + (vocab if c.get("lm_head_bias") else 0),
               attention=0, mlp=0, experts=0, norms=0)
    # attention
    if c.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek V2/V3)
        rope, nope, v_dim, q_rank, kv_rank = (c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"],
                                              c.get("q_lora_rank"), c["kv_lora_rank"])
        q = hidden * q_rank + q_rank + q_rank * heads * (nope + rope) if q_rank else hidden * heads * (nope + rope)
        attention = q + hidden * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v_dim) + heads * v_dim * hidden
    else:
        q_out, kv_out = heads * head_dim, kv * head_dim
        attention = 2 * hidden * q_out + 2 * hidden * kv_out
        if model_type in _QWEN2_QKV_BIAS:
            attention += (q_out + 2 * kv_out) if c.get("qkv_bias", True) else 0
        elif c.get("attention_bias"):
            attention += q_out + 2 * kv_out + hidden
        if model_type in _QK_NORM_HEAD:
            attention += 2 * head_dim
        elif model_type in _QK_NORM_FULL:
            attention += q_out + kv_out
        if model_type == "gpt_oss":
            attention += heads  # attention sinks
    out["attention"] = layers * attention
    # MLP / mixture of experts
    n_experts = first_key(c, "num_local_experts", "num_experts", "n_routed_experts", default=0)
    moe_inter = c.get("moe_intermediate_size") or inter
    dense = 3 * hidden * inter + ((2 * inter + hidden) if c.get("mlp_bias") else 0)
    for index in range(layers):
        if not n_experts:
            out["mlp"] += dense
        elif model_type == "gpt_oss":  # fused gate_up and down with biases, router with bias
            out["mlp"] += n_experts * hidden + n_experts
            out["experts"] += n_experts * (hidden * 2 * moe_inter + 2 * moe_inter + moe_inter * hidden + hidden)
        elif "n_routed_experts" in c:  # DeepSeek: first k layers dense, then routed + shared experts
            if index < c.get("first_k_dense_replace", 0):
                out["mlp"] += dense
                continue
            out["mlp"] += n_experts * hidden + (n_experts if model_type == "deepseek_v3" else 0)
            out["mlp"] += 3 * hidden * moe_inter * c.get("n_shared_experts", 0)
            out["experts"] += n_experts * 3 * hidden * moe_inter
        elif "num_experts" in c:  # Qwen MoE: sparse every decoder_sparse_step layers unless listed dense
            sparse = index not in (c.get("mlp_only_layers") or []) and (index + 1) % c.get("decoder_sparse_step", 1) == 0
            if not sparse:
                out["mlp"] += dense
                continue
            out["mlp"] += n_experts * hidden
            out["experts"] += n_experts * 3 * hidden * moe_inter
            shared = c.get("shared_expert_intermediate_size")
            if shared:
                out["mlp"] += 3 * hidden * shared + hidden
        else:  # Mixtral-style: router + experts in every layer
            out["mlp"] += n_experts * hidden
            out["experts"] += n_experts * 3 * hidden * moe_inter
    # norms
    if model_type in ("gemma2", "gemma3_text"):
        per_layer, final = 4 * hidden, hidden
    elif model_type == "phimoe":  # LayerNorm with bias
        per_layer, final = 4 * hidden, 2 * hidden
    else:
        per_layer, final = 2 * hidden, hidden
    out["norms"] = layers * per_layer + final
    return out


def _gpt2(c: dict) -> dict[str, int]:
    hidden, layers, _, _ = _dims(c)
    inner = c.get("n_inner") or 4 * hidden
    vocab = c["vocab_size"]
    return dict(embeddings=vocab * hidden + c.get("n_positions", 1024) * hidden,
                lm_head=0 if _tied(c) else vocab * hidden,
                attention=layers * (3 * hidden * hidden + 3 * hidden + hidden * hidden + hidden),
                mlp=layers * (2 * hidden * inner + inner + hidden), experts=0, norms=layers * 4 * hidden + 2 * hidden)


def _gpt_neox(c: dict) -> dict[str, int]:
    hidden, layers, _, _ = _dims(c)
    inter, vocab, bias = c["intermediate_size"], c["vocab_size"], c.get("attention_bias", True)
    return dict(embeddings=vocab * hidden, lm_head=0 if _tied(c) else vocab * hidden,
                attention=layers * (4 * hidden * hidden + (4 * hidden if bias else 0)),
                mlp=layers * (2 * hidden * inter + inter + hidden), experts=0, norms=layers * 4 * hidden + 2 * hidden)


def _falcon(c: dict) -> dict[str, int]:
    hidden, layers, heads, head_dim = _dims(c)
    kv, vocab, bias = kv_heads(c), c["vocab_size"], c.get("bias", False)
    ffn = c.get("ffn_hidden_size") or 4 * hidden
    qkv = (heads + 2 * kv) * head_dim
    two_norms = not c.get("parallel_attn", True) or (c.get("new_decoder_architecture") and c.get("num_ln_in_parallel_attn", 2) == 2)
    return dict(embeddings=vocab * hidden, lm_head=0 if _tied(c) else vocab * hidden,
                attention=layers * (hidden * qkv + hidden * hidden + ((qkv + hidden) if bias else 0)),
                mlp=layers * (2 * hidden * ffn + ((ffn + hidden) if bias else 0)), experts=0,
                norms=layers * (4 if two_norms else 2) * hidden + 2 * hidden)


def _phi(c: dict) -> dict[str, int]:
    hidden, layers, heads, head_dim = _dims(c)
    kv, inter, vocab = kv_heads(c), c["intermediate_size"], c["vocab_size"]
    attention = (hidden + 1) * heads * head_dim + 2 * (hidden + 1) * kv * head_dim + hidden * hidden + hidden
    attention += 4 * head_dim if c.get("qk_layernorm") else 0
    return dict(embeddings=vocab * hidden, lm_head=0 if _tied(c) else vocab * hidden + vocab,
                attention=layers * attention, mlp=layers * (2 * hidden * inter + inter + hidden), experts=0,
                norms=layers * 2 * hidden + 2 * hidden)


_SPECIAL_FAMILIES = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "falcon": _falcon, "phi": _phi}


def _vision_parameters(config: dict, text_hidden: int) -> int:
    """Vision tower + projector of a vision-language model (SigLIP and CLIP exactly, other ViTs roughly)."""
    v = config.get("vision_config")
    if not isinstance(v, dict):
        return 0
    model_type = v.get("model_type", "")
    hidden = first_key(v, "hidden_size", "embed_dim", default=0)
    inter = first_key(v, "intermediate_size", default=4 * hidden)
    layers = first_key(v, "num_hidden_layers", "depth", default=0)
    patch, channels = v.get("patch_size", 14), v.get("num_channels", v.get("in_channels", 3))
    patches = (v.get("image_size", 224) // patch) ** 2
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 4 * hidden
    total = layers * layer + 2 * hidden  # + post layernorm
    if model_type == "siglip_vision_model":
        total += channels * patch * patch * hidden + hidden + patches * hidden
        if v.get("vision_use_head", True):
            total += hidden + 4 * (hidden * hidden + hidden) + 2 * hidden + 2 * hidden * inter + inter + hidden
    elif model_type == "clip_vision_model":
        total += channels * patch * patch * hidden + hidden + (patches + 1) * hidden + 2 * hidden  # + pre layernorm
    else:
        total += channels * patch * patch * v.get("temporal_patch_size", 1) * hidden + hidden
    if config.get("model_type") == "gemma3":
        total += hidden * text_hidden + hidden
    elif config.get("model_type") == "llava":
        bias = config.get("multimodal_projector_bias", True)
        total += hidden * text_hidden + text_hidden * text_hidden + (2 * text_hidden if bias else 0)
    else:
        total += hidden * text_hidden
    return total


def count_parameters(config: dict) -> dict[str, int]:
    """Parameters by part (embeddings, lm_head, attention, mlp incl. routers and shared experts, experts, norms,
    vision), counted from a config.json: tied or untied embeddings, q/k/v/o with GQA and biases, q/k norms,
    dense gate/up/down or routed experts x moe_intermediate_size, MLA, norms. Exact for the families tested."""
    text = text_config(config)
    counter = _SPECIAL_FAMILIES.get(text.get("model_type", ""), _llama_like)
    try:
        parts = counter(text)
    except KeyError as missing:
        raise UserError(f"config lacks {missing}; cannot count parameters") from None
    parts["vision"] = _vision_parameters(config, _dims(text)[0]) if text is not config else 0
    return parts


def layer_types(c: dict) -> list[str]:
    """'full_attention' or 'sliding_attention' per layer: from the config, else each family's known pattern."""
    layers = _dims(c)[1]
    given = c.get("layer_types")
    if isinstance(given, list) and len(given) == layers:
        return given
    model_type = c.get("model_type", "")
    if model_type in ("gemma2", "gpt_oss"):
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if model_type == "gemma3_text":
        pattern = first_key(c, "sliding_window_pattern", "_sliding_window_pattern", default=6)
        return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    return ["full_attention"] * layers


def kv_cache_bytes(config: dict, context: int, batch: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of the KV cache for `context` tokens x `batch` sequences (see the module docstring)."""
    c = text_config(config)
    hidden, layers, heads, head_dim = _dims(c)
    if c.get("kv_lora_rank"):
        return layers * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) * context * batch * bytes_per_element
    heads_kv = kv_heads(c)
    per_layer_heads = heads_kv if isinstance(heads_kv, list) else [heads_kv] * layers
    value_dim = c.get("v_head_dim") or head_dim
    window = c.get("sliding_window")
    elements = 0
    for kind, n_kv in zip(layer_types(c), per_layer_heads):
        tokens = min(context, window) if kind == "sliding_attention" and window else context
        elements += n_kv * (head_dim + value_dim) * tokens
    return elements * batch * bytes_per_element


# ----------------------------------------------------------------------------------------- the plan before loading

# bitsandbytes stores the linear layers' weights: nf4 at 4 bits plus one fp32 absmax per 64 (4.5 bits), LLM.int8 at
# 8 bits plus one fp32 scale per row (~8 bits); embeddings, the LM head and norms stay in the compute dtype.
QUANTIZED_BITS = {"4bit": 4.5, "8bit": 8.0}
QUANTIZED_PARTS = ("attention", "mlp", "experts")
GPU_SIZES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141, 192)


def load_bytes(config: dict, dtype_bytes: int, quantize: str = "none") -> int:
    """Bytes of the weights as loaded: every part at `dtype_bytes`, the linear layers at `quantize`'s bits."""
    parts = count_parameters(config)
    if quantize not in QUANTIZED_BITS:
        return sum(parts.values()) * dtype_bytes
    quantized = sum(parts.get(name, 0) for name in QUANTIZED_PARTS)
    return int(quantized * QUANTIZED_BITS[quantize] / 8) + (sum(parts.values()) - quantized) * dtype_bytes


def parse_max_memory(text: str | dict | None) -> dict | None:
    """'cpu=8GB,0=20GB' or a JSON map → accelerate's max_memory ({0: bytes, 'cpu': bytes}); None stays None."""
    if text is None or text == "":
        return None
    if isinstance(text, str) and text.strip().startswith("{"):
        import json

        try:
            pairs = json.loads(text).items()
        except (ValueError, AttributeError) as error:
            raise UserError(f"--max-memory is not a valid JSON map ({error})") from None
    elif isinstance(text, dict):
        pairs = text.items()
    else:
        pairs = [item.partition("=")[::2] for item in str(text).split(",") if item.strip()]
    limits = {}
    for device, size in pairs:
        device = str(device).strip().lower()
        if not re.fullmatch(r"cpu|disk|mps|\d+|cuda:\d+", device) or size in ("", None):
            raise UserError(f"bad --max-memory entry '{device}={size}'; give DEVICE=SIZE pairs such as cpu=8GB,0=20GB")
        key = int(device.removeprefix("cuda:")) if device.removeprefix("cuda:").isdigit() else device
        limits[key] = size if isinstance(size, int) else parse_memory(str(size))
    return limits


def _gpu_for(need: int) -> int | None:
    return next((size for size in GPU_SIZES_GB if size * GIB * 0.9 >= need), None)


def plan_load(config: dict, dtype_bytes: int, quantize: str, max_memory: dict | None, ram: int, gpus: list[int],
              disk: int, reference: str = "the model") -> dict:
    """Does the model fit where it is asked to load (RAM x 0.75 and the GPUs, or `max_memory`'s budgets plus the free
    disk for offload)? The plan as a dict; when it does not fit, a UserError of one line naming what would."""
    weights = load_bytes(config, dtype_bytes, quantize)
    need = int(weights * (1 + OVERHEAD_FRACTION)) + OVERHEAD_FIXED
    if max_memory:
        budget = sum(size for device, size in max_memory.items() if device != "disk") + disk
        where = f"--max-memory ({format_bytes(budget - disk)}) plus {format_bytes(disk)} free disk for offload"
    else:
        budget = int(ram * RAM_USABLE_FRACTION) + sum(gpus)
        where = f"{format_bytes(int(ram * RAM_USABLE_FRACTION))} usable RAM" + (
            f" and {format_bytes(sum(gpus))} on {len(gpus)} GPU(s)" if gpus else ", no GPU")
    plan = {"weights_bytes": weights, "need_bytes": need, "budget_bytes": budget, "fits": need <= budget}
    if plan["fits"]:
        return plan
    options = []
    quantized = int(load_bytes(config, dtype_bytes, "4bit") * (1 + OVERHEAD_FRACTION)) + OVERHEAD_FIXED
    if quantize != "4bit" and quantized <= budget:
        options.append(f"--quantize 4bit ({format_bytes(quantized)})")
    if not max_memory and need <= int(ram * RAM_USABLE_FRACTION) + disk:
        options.append(f"--max-memory cpu={int(ram * RAM_USABLE_FRACTION) // GIB}GB with disk offload "
                       f"({format_bytes(need)} over RAM and disk)")
    if (gpu := _gpu_for(need)) is not None:
        options.append(f"a GPU of {gpu} GB")
    if quantize != "4bit" and (gpu := _gpu_for(quantized)) is not None:
        options.append(f"--quantize 4bit on a GPU of {gpu} GB")
    if _gpu_for(quantized) is None:
        options.append(f"--quantize 4bit on {gpus_of_80gb(quantized)} GPUs of 80 GB")
    raise UserError(f"{reference} needs about {format_bytes(need)} to load ({format_bytes(weights)} of weights, "
                    f"{quantize if quantize != 'none' else f'{dtype_bytes * 8}-bit'}) but has {where}; would fit: "
                    + "; or ".join(options))


def gpus_of_80gb(need: int) -> int:
    return -(-need // int(80 * GIB * 0.9))


def available_memory(offload_folder: str | None = None) -> tuple[int, list[int], int]:
    """This machine's available RAM, each GPU's total memory, and the free disk where offloaded weights would go."""
    import shutil
    import tempfile

    import psutil
    import torch

    gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    folder = offload_folder or tempfile.gettempdir()
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder.rstrip("/")) or "/"
    return psutil.virtual_memory().available, gpus, shutil.disk_usage(folder or "/").free
