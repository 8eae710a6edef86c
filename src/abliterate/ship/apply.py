"""`abliterate apply`: bake an ablation into the weights and write the model (a complete HF model, or a GGUF
edited in place of a GGUF).

A safetensors model on disk (a folder, the bundled alias, or a hub id complete in the local HF cache) edited in its
stored dtype is baked shard by shard without loading it (ship/shard_bake.py): the same tensors, bit for bit, in the
checkpoint's own shard layout, in about one tensor's memory; a GGUF likewise, tensor by tensor (ship/gguf_edit.py).
Anything else is loaded and baked in memory."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

from abliterate.core.save import save_hf
from abliterate.core.settings import APPLY_DTYPE
from abliterate.measure.ablation import bake, plan_edits
from abliterate.ship.shard_bake import NotShardable, ShardPlan, find_checkpoint, plan_shard_edits, write_baked
from abliterate.ship.gguf_edit import GGUFEdit, NotStreamable, edit_gguf, edited_parameters, plan_gguf_edit, write_edited_gguf

Status = Callable[[str], ContextManager]


def _baked(loaded, refusal, params, status: Status):
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    with status("editing weights"):
        bake(edits, params.norm_preserving)
    return edits


def _record(reference: str, revision, refusal, params, directions_file: str, edit_count: int) -> dict:
    return {
        "base_model": reference,
        "revision": revision,
        "directions": {"file": str(directions_file), **refusal.metadata},
        "parameters": params.to_dict(),
        "edited_components": edit_count,
    }


def apply_to_hf(loaded, refusal, params, output: str, directions_file: str,
                status: Status = lambda message: contextlib.nullcontext()) -> int:
    """Bake and save `output` with its abliteration.json; the number of component edits."""
    edits = _baked(loaded, refusal, params, status)
    record = _record(loaded.source.reference, loaded.source.revision, refusal, params, directions_file, len(edits))
    with status(f"saving {output}"):
        save_hf(loaded.model, loaded.tokenizer, output, {"abliteration.json": record})
    return len(edits)


def apply_shard_wise(model: str, revision, dtype: str, trust_remote_code: bool, refusal, params, output: str,
                     directions_file: str, status: Status = lambda message: contextlib.nullcontext(),
                     note=lambda line: None) -> ShardPlan | None:
    """Bake shard by shard when `model` is a safetensors checkpoint on disk edited as stored; what was baked, or
    None when it is not (then load it and use `apply_to_hf`). `note` hears why not, where a checkpoint was found."""
    if dtype != APPLY_DTYPE:
        return None  # another dtype means converting every tensor: the loaded model does that
    try:
        with status("planning the edit from config.json"):
            checkpoint = find_checkpoint(model, revision, trust_remote_code)
            if checkpoint is None:
                return None
            plan = plan_shard_edits(checkpoint, refusal, params, trust_remote_code)
    except NotShardable as reason:
        note(f"loading the whole model: {reason}")
        return None
    record = _record(model, revision, refusal, params, directions_file, plan.edit_count)
    write_baked(plan, output, {"abliteration.json": record}, on_shard=lambda step: status(step.describe()))
    return plan


def apply_gguf_streaming(model: str, trust_remote_code: bool, refusal, params, output: str,
                         status: Status = lambda message: contextlib.nullcontext(),
                         note=lambda line: None) -> GGUFEdit | None:
    """Edit the .gguf `model` tensor by tensor into `output` without loading it; the report, or None when this
    architecture needs the dense path (then load it and use `apply_to_gguf`; `note` hears why)."""
    try:
        with status("planning the edit from the GGUF's config"):
            plan = plan_gguf_edit(model, refusal, params, trust_remote_code)
        with status(f"writing {output}, tensor by tensor"):
            return edit_gguf(plan, output)
    except NotStreamable as reason:
        note(f"loading the whole model: {reason}")
        return None


def apply_to_gguf(loaded, refusal, params, output: str, status: Status = lambda message: contextlib.nullcontext()):
    """Bake and write `output`, a copy of the loaded .gguf with the edited tensors re-encoded; its report."""
    edits = _baked(loaded, refusal, params, status)
    with status(f"writing {output}"):
        return write_edited_gguf(Path(loaded.source.path) / loaded.source.gguf_file, output, loaded.model,
                                 edited_parameters(edits))
