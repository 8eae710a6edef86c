"""An ablation applied at inference time, reversibly, on the engine that generates (chat and serve without a saved
model)."""

from __future__ import annotations

import contextlib

from abliterate.errors import UserError
from abliterate.measure.ablation import plan_edits


def inference_ablation(engine, loaded, refusal, params):
    """The ablation of `refusal` (Directions) by `params` on `engine`, which runs the loaded model (a no-op context
    without directions)."""
    if refusal is None:
        return contextlib.nullcontext()
    if params.norm_preserving and getattr(loaded, "quantize", "none") != "none":
        raise UserError(f"norm-preserving edits rewrite weights, which a {loaded.quantize} model cannot; drop one of them")
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    return engine.ablated(edits, params.norm_preserving)
