"""`abliterate apply`: bake an ablation into the weights and write the model (a complete HF model, or a GGUF
edited in place of a GGUF)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, ContextManager

from abliterate.measure.ablation import bake, plan_edits
from abliterate.core.save import save_hf
from abliterate.ship.gguf_edit import edited_parameters, write_edited_gguf

Status = Callable[[str], ContextManager]


def _baked(loaded, refusal, params, status: Status):
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    with status("editing weights"):
        bake(edits, params.norm_preserving)
    return edits


def apply_to_hf(loaded, refusal, params, output: str, directions_file: str,
                status: Status = lambda message: contextlib.nullcontext()) -> int:
    """Bake and save `output` with its abliteration.json; the number of component edits."""
    edits = _baked(loaded, refusal, params, status)
    record = {
        "base_model": loaded.source.reference,
        "revision": loaded.source.revision,
        "directions": {"file": str(directions_file), **refusal.metadata},
        "parameters": params.to_dict(),
        "edited_components": len(edits),
    }
    with status(f"saving {output}"):
        save_hf(loaded.model, loaded.tokenizer, output, {"abliteration.json": record})
    return len(edits)


def apply_to_gguf(loaded, refusal, params, output: str, status: Status = lambda message: contextlib.nullcontext()):
    """Bake and write `output`, a copy of the loaded .gguf with the edited tensors re-encoded; its report."""
    edits = _baked(loaded, refusal, params, status)
    with status(f"writing {output}"):
        return write_edited_gguf(Path(loaded.source.path) / loaded.source.gguf_file, output, loaded.model,
                                 edited_parameters(edits))
