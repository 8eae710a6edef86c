"""The model catalog (`abliterate models`) and memory estimates (`abliterate models estimate`).

The counting (parameters per part, KV cache, overhead, memory sizes) lives in `core/memory.py`, where the plan that
every load makes first uses it too; this module adds GGUF quants, the catalog and the `estimate` report.

A small pure core: the catalog is data (`data/catalog.toml`, validated here with pydantic), an estimate is
arithmetic on a config.json (or a GGUF header). Nothing here imports torch or reads weights.

Memory sizes are binary, as RAM and VRAM are sold: "16GB" = 16 GiB = 16 x 2^30 bytes.

What a model needs (both for `models` filtering and for `estimate`):

* weights: parameters (counted from the config) x bytes per parameter of the dtype, or x bits per weight of
  a GGUF quant / 8; for a `.gguf` file as stored, its real tensor bytes;
* KV cache: per layer 2 (K and V) x KV heads x head_dim x cached tokens x batch x 2 bytes (f16; 4 for fp32),
  where a sliding-window layer caches at most `sliding_window` tokens, and an MLA layer (DeepSeek V2/V3)
  caches one latent of kv_lora_rank + qk_rope_head_dim per token (llama.cpp, vLLM and SGLang do this;
  transformers' own cache stores the decompressed K and V, far more);
* overhead: 0.5 GiB + 5 % of the weights (runtime, activations, compute buffers).

On a GPU, weights + KV cache + overhead sit in VRAM and the host keeps ~1 GiB for the runtime; on a CPU (or
Apple unified memory) all of it is system RAM, of which only 75 % is counted as usable (the OS keeps the
rest; macOS lets the GPU wire about that much of unified memory).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from abliterate.core.memory import (  # noqa: F401 - re-exported: the estimator lives in core
    DEFAULT_CONTEXT, DTYPE_BYTES, GIB, HOST_RAM_WITH_GPU, OVERHEAD_FIXED, OVERHEAD_FRACTION, RAM_USABLE_FRACTION,
    count_parameters, first_key, format_bytes, format_count, kv_cache_bytes, layer_types, parse_memory, text_config)
from abliterate.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TIERS = ("entry", "medium", "large", "enterprise")
USES = ("coding", "reasoning", "chat")
DEFAULT_QUANTS = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "BF16"]
Source = Literal["reference 000", "reference 003", "model card"]


def bits_per_weight() -> dict[str, float]:
    return load_catalog().bits_per_weight


def weight_bytes(parts: dict[str, int], fmt: str) -> int:
    """Bytes of the weights in `fmt`: a dtype name or a GGUF quant (MXFP4: experts only, the rest BF16)."""
    total = sum(parts.values())
    if fmt.lower() in DTYPE_BYTES:
        return total * DTYPE_BYTES[fmt.lower()]
    bpw = bits_per_weight()
    if fmt == "MXFP4":
        return int(parts.get("experts", 0) * bpw["MXFP4"] / 8) + (total - parts.get("experts", 0)) * 2
    return int(total * bpw[fmt] / 8)


def _normalise_format(dtype: str | None, quant: str | None) -> str | None:
    if dtype and quant:
        raise UserError("give --dtype or --quant, not both")
    if dtype:
        if dtype.lower() not in DTYPE_BYTES:
            raise UserError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPE_BYTES)}")
        return {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}.get(
            dtype.lower(), dtype.lower())
    if quant:
        known = bits_per_weight()
        if quant.upper() not in known:
            raise UserError(f"unknown quant '{quant}'; use one of {', '.join(known)}")
        return quant.upper()
    return None


def estimate(config: dict, dtype: str | None = None, quant: str | None = None, context: int | None = None,
             batch: int = 1, stored_weights_bytes: int | None = None, stored_parameters: int | None = None) -> dict:
    """Memory for weights and KV cache, VRAM and system RAM apart. Without dtype/quant: as stored (the real
    tensor bytes of a GGUF, else the config's dtype, bf16 if it names none)."""
    if batch <= 0 or (context is not None and context <= 0):
        raise UserError("--context and --batch must be positive")
    text = text_config(config)
    parts = count_parameters(config)
    parameters = stored_parameters or sum(parts.values())
    fmt = _normalise_format(dtype, quant)
    if fmt is None and stored_weights_bytes is not None:
        fmt, weights = "as stored", stored_weights_bytes
    else:
        if fmt is None:
            stored = first_key(config, "dtype", "torch_dtype") or first_key(text, "dtype", "torch_dtype") or "bfloat16"
            fmt = stored if str(stored).lower() in DTYPE_BYTES else "bfloat16"
        if stored_parameters and sum(parts.values()) != stored_parameters:  # GGUF: scale the counted parts
            scale = stored_parameters / max(sum(parts.values()), 1)
            parts = {name: round(count * scale) for name, count in parts.items()}
        weights = weight_bytes(parts, fmt)
    max_context = text.get("max_position_embeddings")
    context = context or min(DEFAULT_CONTEXT, max_context or DEFAULT_CONTEXT)
    kv = kv_cache_bytes(config, context, batch, 4 if fmt == "float32" else 2)
    overhead = int(OVERHEAD_FIXED + OVERHEAD_FRACTION * weights)
    return {
        "model_type": text.get("model_type"), "parameters": parameters, "parameters_breakdown": parts,
        "format": fmt, "bits_per_weight": round(8 * weights / max(parameters, 1), 3),
        "weights_bytes": weights, "kv_cache_bytes": kv, "context": context, "max_context": max_context,
        "batch": batch, "kv_bytes_per_element": 4 if fmt == "float32" else 2, "overhead_bytes": overhead,
        "gpu": {"vram_bytes": weights + kv + overhead, "ram_bytes": HOST_RAM_WITH_GPU},
        "cpu": {"ram_bytes": weights + kv + overhead},
    }


# ----------------------------------------------------------------------------------------- reading a model

GGUF_ARCHITECTURES = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe",
                      "deepseek2": "deepseek_v3", "gpt-oss": "gpt_oss", "phimoe": "phimoe"}


@dataclass
class ModelConfig:
    """A model's config as a dict, where it came from, and for a GGUF its real tensor bytes and elements."""

    config: dict
    source: str
    weights_bytes: int | None = None
    parameters: int | None = None


def read_gguf(path: Path) -> ModelConfig:
    """An HF-like config from a GGUF header (`<arch>.block_count`, `embedding_length`, ...), plus the tensors' bytes."""
    from gguf import LlamaFileType

    from abliterate.core.gguf_reader import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:  # noqa: BLE001 - any parse failure means the same to the user
        raise UserError(f"{path} is not a readable GGUF file ({error})") from None

    def field(key):
        found = reader.fields.get(key)
        return found.contents() if found is not None else None

    arch = field("general.architecture")
    if not arch:
        raise UserError(f"{path} has no general.architecture in its GGUF header")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    mapping = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
               "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
               "head_dim": "attention.key_length", "v_head_dim": "attention.value_length",
               "intermediate_size": "feed_forward_length", "max_position_embeddings": "context_length",
               "sliding_window": "attention.sliding_window", "num_local_experts": "expert_count",
               "num_experts_per_tok": "expert_used_count", "moe_intermediate_size": "expert_feed_forward_length",
               "kv_lora_rank": "attention.kv_lora_rank", "vocab_size": "vocab_size"}
    config: dict[str, Any] = {"model_type": GGUF_ARCHITECTURES.get(arch, arch)}
    for name, key in mapping.items():
        value = field(f"{arch}.{key}")
        if value is not None:
            config[name] = value
    if "vocab_size" not in config and tokens is not None:
        config["vocab_size"] = len(tokens.data)
    if config.get("kv_lora_rank"):
        config["qk_rope_head_dim"] = field(f"{arch}.rope.dimension_count")
    pattern = field(f"{arch}.attention.sliding_window_pattern")  # per-layer bools, or every n-th layer full
    if isinstance(pattern, list):
        config["layer_types"] = ["sliding_attention" if swa else "full_attention" for swa in pattern]
    elif pattern:
        config["sliding_window_pattern"] = pattern
    file_type = field("general.file_type")
    try:
        config["gguf_file_type"] = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        config["gguf_file_type"] = None
    return ModelConfig(config, f"GGUF {path.name}", weights_bytes=sum(int(t.n_bytes) for t in reader.tensors),
                       parameters=sum(int(t.n_elements) for t in reader.tensors))


def _hub_config(repo: str, revision: str | None) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    try:
        path = hf_hub_download(repo, "config.json", revision=revision)
    except GatedRepoError:
        raise UserError(f"{repo} is gated on the hub: accept its terms there and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo} not found on the hub (private? log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise UserError(f"revision {revision} of {repo} not found on the hub") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise UserError(f"cannot fetch {repo}/config.json: offline and not cached; give a local directory, a "
                        ".gguf file or a catalog name (see `abliterate models`)") from None
    except EntryNotFoundError:
        raise UserError(f"{repo} has no config.json (a GGUF-only repository?); download a .gguf and give its path") from None
    except OSError as error:
        raise UserError(f"cannot fetch {repo}/config.json from the hub: {str(error).splitlines()[0]}") from None
    return json.loads(Path(path).read_text())


def read_model_config(reference: str, revision: str | None = None) -> ModelConfig:
    """Config of a local HF directory (config.json), a `.gguf` file, the bundled `tiny`, a catalog name or id
    (stored config, works offline), or a hub id (config.json downloaded)."""
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return read_gguf(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            try:
                return ModelConfig(json.loads((path / "config.json").read_text()), f"{path / 'config.json'}")
            except json.JSONDecodeError as error:
                raise UserError(f"{path / 'config.json'} is not valid JSON ({error})") from None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return read_gguf(ggufs[0])
        raise UserError(f"{path} has no config.json; give a Hugging Face model directory or a .gguf file")
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    from abliterate.core.bundled import BUNDLED, bundled_gguf

    if reference in BUNDLED:
        return read_gguf(bundled_gguf(BUNDLED[reference]))
    entry = load_catalog().get(reference)
    if entry is not None:
        return ModelConfig(entry.config, f"catalog ({entry.key}; config from the model card)")
    if reference.count("/") != 1 or reference.startswith((".", "/", "~")) or reference.endswith(".gguf"):
        raise UserError(f"model not found: {reference}; give a directory, a .gguf file, a catalog name or a hub id")
    return ModelConfig(_hub_config(reference, revision), f"hub {reference}/config.json")


# ----------------------------------------------------------------------------------------- the catalog


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: str
    hardware: str

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)


class Entry(BaseModel):
    """One recommended model. `config` holds the text model's config.json fields (from the model card)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    id: str
    base_model: str
    tier: Literal["entry", "medium", "large", "enterprise"]
    default: bool = False
    uncensoring: Literal["abliteration", "fine-tune", "post-training"]
    reasoning: bool
    uses: list[Literal["coding", "reasoning", "chat"]]
    parameters_stated: str
    licence: str
    commercial_use: bool
    commercial_terms: str
    notes: str = ""
    quants: list[str] = DEFAULT_QUANTS
    recommended_quant: str = "Q4_K_M"
    superseded_by: str | None = None
    reference_sizes_gb: dict[str, float] = {}
    sources: dict[str, Source]
    config: dict[str, Any]

    @model_validator(mode="after")
    def _check(self):
        if self.recommended_quant not in self.quants:
            raise ValueError(f"{self.key}: recommended_quant {self.recommended_quant} is not in quants")
        unknown = set(self.sources) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"{self.key}: sources name unknown fields {sorted(unknown)}")
        missing = {"model_type", "hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings"} - set(self.config)
        if missing:
            raise ValueError(f"{self.key}: config lacks {sorted(missing)}")
        return self

    @functools.cached_property
    def parameter_parts(self) -> dict[str, int]:
        return count_parameters(self.config)

    @property
    def parameters(self) -> int:
        return sum(self.parameter_parts.values())

    @property
    def architecture(self) -> str:
        return self.config["model_type"]

    @property
    def context(self) -> int:
        return self.config["max_position_embeddings"]

    def size_bytes(self, quant: str) -> int:
        return weight_bytes(self.parameter_parts, quant)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default_context: int
    bits_per_weight: dict[str, float]
    tiers: dict[Literal["entry", "medium", "large", "enterprise"], Tier]
    models: list[Entry]

    @model_validator(mode="after")
    def _check(self):
        keys = [m.key for m in self.models]
        if len(set(keys)) != len(keys) or len({m.id.lower() for m in self.models}) != len(keys):
            raise ValueError("duplicate key or id")
        for model in self.models:
            if model.superseded_by is not None and model.superseded_by not in keys:
                raise ValueError(f"{model.key}: superseded_by {model.superseded_by} is not in the catalog")
            if model.superseded_by and model.default:
                raise ValueError(f"{model.key}: a superseded model cannot be a tier's default")
            if set(model.quants) - set(self.bits_per_weight):
                raise ValueError(f"{model.key}: unknown quants {sorted(set(model.quants) - set(self.bits_per_weight))}")
        for tier in TIERS:
            if sum(m.default for m in self.models if m.tier == tier) > 1:
                raise ValueError(f"tier {tier} has more than one default pick")
        return self

    def get(self, name: str) -> Entry | None:
        return next((m for m in self.models if name in (m.key, m.id) or name.lower() == m.id.lower()), None)

    def default_for(self, tier: str) -> Entry | None:
        return next((m for m in self.models if m.tier == tier and m.default), None)


@functools.lru_cache(maxsize=4)
def load_catalog(path: str | None = None) -> Catalog:
    """The catalog shipped in the package (or a TOML file of the same shape), validated."""
    try:
        text = Path(path).read_text() if path else resources.files("abliterate").joinpath("data/catalog.toml").read_text()
        return Catalog.model_validate(tomllib.loads(text))
    except FileNotFoundError:
        raise UserError(f"catalog file not found: {path}") from None
    except (tomllib.TOMLDecodeError, ValidationError) as error:
        raise UserError(f"invalid catalog {path or 'data/catalog.toml'}: {str(error).splitlines()[0]}") from None


@dataclass
class Fit:
    quant: str
    placement: str  # "GPU", "GPU+CPU" (partial offload), "CPU/unified", or "" (no memory given)
    weights_bytes: int
    kv_cache_bytes: int
    needs_bytes: int


def requirement(entry: Entry, quant: str, context: int) -> Fit:
    """Weights in `quant` + f16 KV cache for `context` tokens + overhead (0.5 GiB + 5 % of the weights)."""
    weights = entry.size_bytes(quant)
    kv = kv_cache_bytes(entry.config, context)
    return Fit(quant, "", weights, kv, int(weights + kv + OVERHEAD_FIXED + OVERHEAD_FRACTION * weights))


def fit(entry: Entry, memory: int | None = None, vram: int | None = None, context: int = DEFAULT_CONTEXT) -> Fit | None:
    """The best way `entry` runs in this memory, or None if it does not fit.

    A model fits if its recommended quant (Q4_K_M unless the entry says otherwise) fits: weights + KV cache
    for `context` tokens + overhead ≤ VRAM (placement GPU; the host then needs ~1 GiB of RAM), else
    ≤ VRAM + usable RAM (GPU+CPU, partial offload), else, with no --vram, ≤ usable RAM (CPU/unified memory),
    where usable RAM is 75 % of --memory. Among the quants at least as large as the recommended one, the
    best placement wins, then the largest quant with it. Without memory or VRAM, every model "fits" with its
    recommended quant.
    """
    fits = [requirement(entry, q, context) for q in entry.quants]
    floor = entry.size_bytes(entry.recommended_quant)
    candidates = sorted((f for f in fits if f.weights_bytes >= floor), key=lambda f: -f.weights_bytes)
    if memory is None and vram is None:
        return requirement(entry, entry.recommended_quant, context)
    usable = memory * RAM_USABLE_FRACTION if memory is not None else None
    for placement in ("GPU", "GPU+CPU", "CPU/unified"):
        for candidate in candidates:
            need = candidate.needs_bytes
            if placement == "GPU" and vram is not None and need <= vram and (usable is None or usable >= HOST_RAM_WITH_GPU):
                ok = True
            elif placement == "GPU+CPU" and vram is not None and usable is not None and need <= vram + usable:
                ok = True
            else:
                ok = placement == "CPU/unified" and vram is None and need <= usable
            if ok:
                candidate.placement = placement
                return candidate
    return None


def describe(entry: Entry, chosen: Fit | None, context: int) -> dict:
    """One entry as JSON-ready data, with sizes per quant and the chosen fit."""
    return {
        "key": entry.key, "id": entry.id, "base_model": entry.base_model, "tier": entry.tier, "default": entry.default,
        "architecture": entry.architecture, "parameters": entry.parameters, "parameters_stated": entry.parameters_stated,
        "context": entry.context, "reasoning": entry.reasoning, "uses": entry.uses, "uncensoring": entry.uncensoring,
        "licence": entry.licence, "commercial_use": entry.commercial_use, "commercial_terms": entry.commercial_terms,
        "superseded_by": entry.superseded_by, "notes": entry.notes,
        "sizes_bytes": {q: entry.size_bytes(q) for q in entry.quants},
        "reference_sizes_gb": entry.reference_sizes_gb,
        "kv_cache_bytes": kv_cache_bytes(entry.config, context),
        "fit": None if chosen is None else {"quant": chosen.quant, "placement": chosen.placement,
                                            "weights_bytes": chosen.weights_bytes, "needs_bytes": chosen.needs_bytes},
        "sources": entry.sources,
    }


def select(memory: int | None = None, vram: int | None = None, use: str | None = None,
           context: int | None = None, catalog: Catalog | None = None) -> dict:
    """The catalog filtered by memory, VRAM and use, sorted by tier (default pick first), with the pick: the
    default of the largest tier that fits (and suits `use`), else the largest fitting current model."""
    catalog = catalog or load_catalog()
    context = catalog.default_context if context is None else context
    if context <= 0:
        raise UserError("--context must be positive")
    if use is not None and use not in USES:
        raise UserError(f"unknown use '{use}'; use one of {', '.join(USES)}")
    rows = []
    for entry in catalog.models:
        if use is not None and use not in entry.uses:
            continue
        chosen = fit(entry, memory, vram, context)
        if chosen is not None:
            rows.append(describe(entry, chosen, context))
    rows.sort(key=lambda r: (TIERS.index(r["tier"]), not r["default"], r["superseded_by"] is not None, r["parameters"]))
    current = [r for r in rows if r["superseded_by"] is None]
    defaults = [r for r in current if r["default"]]
    pick = (defaults or sorted(current, key=lambda r: r["parameters"]))[-1]["key"] if current else None
    return {"memory_bytes": memory, "vram_bytes": vram, "use": use, "context": context,
            "usable_ram_fraction": RAM_USABLE_FRACTION, "pick": pick, "models": rows}
