"""Saving models: a complete Hugging Face directory, written to a temporary path and renamed when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from abliterate.errors import UserError
from abliterate.load import clear_gguf_quantizer


def check_output_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose another -o or remove it")
    return out


def save_hf(model, tokenizer, out_dir: str | Path, extra_files: dict[str, str | dict] | None = None) -> Path:
    """Write model (safetensors), config, tokenizer and chat template, plus `extra_files`; atomic rename."""
    out = check_output_dir(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        clear_gguf_quantizer(model)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        for name, content in (extra_files or {}).items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
            (partial / name).write_text(text)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
