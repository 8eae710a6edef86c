"""Saving models: a complete Hugging Face directory, written to a temporary path and renamed when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from abliterate.errors import UserError
from abliterate.core.gguf_reader import clear_gguf_quantizer


def check_output_dir(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose another -o or remove it")
    return out


# Per-family keys that readers of config.json other than transformers (mlx_lm) still require under their
# pre-transformers-5 names.
_LEGACY_KEYS = {"gpt2": {"n_ctx": "n_positions"},
                "gpt_neox": {"rotary_emb_base": "rope_theta", "rotary_pct": "partial_rotary_factor"}}


def _with_legacy_keys(config: dict, attribute_map: dict) -> dict:
    """Also write config values under the flat, pre-transformers-5 names (`rope_theta`, `rope_scaling`,
    `partial_rotary_factor`, attribute aliases such as `num_experts`): transformers 5 nests rope settings
    under `rope_parameters`, and mlx_lm and other loaders otherwise fall back to wrong defaults or refuse."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3)
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local:
            config.setdefault("rope_local_base_freq", local["rope_theta"])
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if "partial_rotary_factor" in rope:
            config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", rope)
    for alias, name in attribute_map.items():
        if name in config:
            config.setdefault(alias, config[name])
    for alias, name in _LEGACY_KEYS.get(config.get("model_type"), {}).items():
        if name in config:
            config.setdefault(alias, config[name])
    return config


def write_legacy_config_keys(model, model_dir: Path) -> None:
    """Rewrite `model_dir/config.json` (just written by save_pretrained) with `_with_legacy_keys`, for the
    top-level config and a vision-language model's `text_config`."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    _with_legacy_keys(config, getattr(model.config, "attribute_map", {}))
    text_config = getattr(model.config, "text_config", None)
    if isinstance(config.get("text_config"), dict) and text_config is not None:
        _with_legacy_keys(config["text_config"], getattr(text_config, "attribute_map", {}))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_hf(model, tokenizer, out_dir: str | Path, extra_files: dict[str, str | dict] | None = None) -> Path:
    """Write model (safetensors), config, tokenizer and chat template, plus `extra_files`; atomic rename."""
    out = check_output_dir(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        clear_gguf_quantizer(model)
        model.save_pretrained(partial, safe_serialization=True)
        write_legacy_config_keys(model, partial)
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


def save_into(model, tokenizer, out_dir: Path, extra_files: dict[str, str], record_name: str, record: dict) -> None:
    """Write a complete model into an existing run directory: files are written beside it, then moved in;
    the record (`abliteration.json`) goes last, so its presence means the model files are complete."""
    staging = out_dir / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    (out_dir / record_name).unlink(missing_ok=True)
    clear_gguf_quantizer(model)
    model.save_pretrained(staging, safe_serialization=True)
    write_legacy_config_keys(model, staging)
    tokenizer.save_pretrained(staging)
    for name, text in extra_files.items():
        (staging / name).write_text(text)
    for path in staging.iterdir():
        path.replace(out_dir / path.name)
    staging.rmdir()
    partial = out_dir / (record_name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(out_dir / record_name)


def _fmt(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def model_card(record: dict) -> str:
    """A Hugging Face model card: what was done, measured how, and how to use it."""
    base, edited = record["metrics"]["base"], record["metrics"]["abliterated"]
    rows = []
    for split, label in (("tune", "tune (optimised on)"), ("eval", "eval (held out)")):
        b, a = base[split], edited[split]
        rows.append(f"| {label} | {b['refusals']}/{b['total']} | {a['refusals']}/{a['total']} | {_fmt(a['kl'])} | "
                    f"{_fmt(a['kl_multi_token'])} |")
    params = json.dumps(record["parameters"], indent=2)
    return f"""---
base_model: {record['base_model']}
library_name: transformers
tags:
- abliterated
- uncensored
---

# {record['base_model']} — abliterated

The refusal direction of `{record['base_model']}` removed from its weights by directional ablation
({record['tool']}), trial {record['trial']} of {record['trials_finished']}
of a multi-objective search minimising refusals and KL divergence.

| split | refusals (base) | refusals (abliterated) | first-token KL | multi-token KL |
|---|---|---|---|---|
{chr(10).join(rows)}

Refusals judged by the `{record['judge']}` judge on greedy answers of up to {record['settings']['max_new_tokens']} tokens;
KL(base ‖ abliterated) on benign prompts of the same split. The search saw only the tune split; the eval
split is held out. Measured in {record['dtype']} on the weights as saved.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")
```

Reproduce the held-out numbers: `abliterate eval PATH --base {record['base_model']} --split eval \
--limit {record['settings']['eval_prompts']} --max-new-tokens {record['settings']['max_new_tokens']} \
--kl-tokens {record['settings']['kl_tokens']} --judge {record['judge']} --dtype {record['dtype']} \
--batch-size {record.get('batch_size', 16)}` (the same batches: in low precision, padding changes the last bits).

## Parameters

```json
{params}
```

`abliteration.json` holds everything needed to reproduce the run: parameters, the directions file's sha256,
the seed, all settings and the sha256 of every prompt set.

This model no longer refuses harmful requests reliably. You are responsible for how you use it.
"""
