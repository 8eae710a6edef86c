"""Benchmark: refusal evaluation with early decision against full-length generation, same prompts, same run.

    python bench/eval.py [--model tiny] [--judge classifier] [--prompts 48] [--max-new-tokens 48] [--batch-size 16]
                         [--ablate-layer 15]

Early decision stops a sequence once the judge's verdict cannot change and drops decided rows from the batch.
Prints both timings, their ratio, the tokens saved, and checks that every verdict is identical. With
--ablate-layer, the same is measured on a model with that direction ablated (few refusals: the case a
search spends most of its trials in).
"""

from __future__ import annotations

import harness
from abliterate.core.judges import DEFAULT_JUDGE, get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import format_prompts, load_prompts
from abliterate.measure.ablation import AblationParams, ablate, plan_edits
from abliterate.measure.directions import measure_directions
from abliterate.measure.engines.transformers import TransformersEngine
from abliterate.measure.evaluate import measure_refusals


def compare(label, loaded, prompts, judge, args) -> dict:
    timings = harness.alternate({
        name: lambda early=early: measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), prompts, judge, args.max_new_tokens,
                                                   args.batch_size, early_stop=early)
        for name, early in (("full length", False), ("early decision", True))
    }, repeats=1)
    full, early = timings["full length"].values[0], timings["early decision"].values[0]
    seconds = {name: timing.best for name, timing in timings.items()}
    identical = full.verdicts == early.verdicts
    speedup = harness.ratio(seconds["full length"], seconds["early decision"])
    print(f"{label}: refusals {early.refusals}/{early.total}; full {seconds['full length']:.1f} s, "
          f"early {seconds['early decision']:.1f} s: {speedup:.2f}x faster; "
          f"decode tokens {full.tokens_generated} -> {early.tokens_generated}; verdicts identical: {identical}")
    return {"refusals": early.refusals, "total": early.total, "seconds": seconds, "speedup": speedup,
            "decode_tokens": {"full length": full.tokens_generated, "early decision": early.tokens_generated},
            "verdicts_identical": identical}


def main():
    parser = harness.parser(__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--judge", default=DEFAULT_JUDGE)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ablate-layer", type=float, default=15)
    args = parser.parse_args()
    loaded = load_model(args.model)
    judge = get_judge(args.judge)
    prompts = format_prompts(loaded.tokenizer, load_prompts("harmful", split="tune")[: args.prompts])
    print(f"model {args.model} ({loaded.dtype}), judge {judge.name}, {len(prompts)} tune-split harmful prompts, "
          f"{args.max_new_tokens} new tokens, batch {args.batch_size}")
    cases = {"base": compare("base", loaded, prompts, judge, args)}
    if args.ablate_layer is not None:
        directions = measure_directions(loaded, load_prompts("harmful", split="train")[:32],
                                        load_prompts("harmless", split="train")[:32])
        with ablate(plan_edits(loaded.adapter, directions.directions, AblationParams.single_direction(args.ablate_layer))):
            cases["ablated"] = compare(f"ablated (layer {args.ablate_layer:g})", loaded, prompts, judge, args)
    ok = all(case["verdicts_identical"] for case in cases.values())
    base = cases["base"]
    harness.record("eval", {
        "model": args.model, "dtype": str(loaded.dtype), "judge": judge.name, "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "ablate_layer": args.ablate_layer,
        **cases,
    }, title="early decision", path=args.json,
        headline=f"decode tokens {base['decode_tokens']['full length']} → {base['decode_tokens']['early decision']} "
                 f"on the base model ({base['speedup']:.2f}x), verdicts {'identical' if ok else 'DIFFER'}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
