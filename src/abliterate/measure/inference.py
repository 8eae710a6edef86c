"""An ablation applied at inference time, as reversible hooks (chat and serve without a saved model)."""

from __future__ import annotations

import contextlib

from abliterate.errors import UserError
from abliterate.measure.ablation import ablate, plan_edits


def inference_ablation(loaded, refusal, params):
    """The ablation of `refusal` (Directions) by `params` on the loaded model (a no-op context without directions)."""
    if refusal is None:
        return contextlib.nullcontext()
    if params.norm_preserving and getattr(loaded, "quantize", "none") != "none":
        raise UserError(f"norm-preserving edits rewrite weights, which a {loaded.quantize} model cannot; drop one of them")
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    return ablate(edits, params.norm_preserving)
