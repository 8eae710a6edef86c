"""Do ablations make a model refuse prompts its base answers? Per-prompt verdicts of the base and of trials along a
run's Pareto front, on one split: why `abliterate run`'s trials answer only the tune prompts the base refuses
(`search_prompts = "refused"`).

    python bench/experiments/answered_prompts.py RUN_DIR [--split eval] [--limit 154] [--trials 4]

RUN_DIR is an `abliterate run` output (its directions and study journal); `--trials` front members are taken evenly
from the fewest-refusals end. Each trial's ablation is applied as a trial applies it (hooks), answers generated with
the run's judge and token budget (classifier, 32), and compared prompt by prompt with the base's. Prints, per trial,
refusals on the prompts the base answers and on those it refuses, and the answers that turned into refusals.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from abliterate.measure.ablation import AblationParams, ablate, plan_edits
from abliterate.measure.directions import Directions
from abliterate.measure.evaluate import measure_refusals
from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import format_prompts, load_prompts
from abliterate.search.study import open_study, pareto_front
from abliterate.measure.engines.transformers import TransformersEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="eval")
    parser.add_argument("--limit", type=int, default=154)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    identity = json.loads((args.run_dir / "run.json").read_text())["identity"]
    loaded = load_model(identity["model"], identity["dtype"])
    directions = Directions.load(args.run_dir / "directions.safetensors").fitted_to(loaded.adapter)
    front = pareto_front(open_study(str(args.run_dir / "study.journal"), 0, 0))
    chosen = front[::max(1, len(front) // args.trials)][: args.trials]
    print("front:", ", ".join(f"trial {t.number} {t.values[0]:.0f} refusals KL {t.values[1]:.3f}" for t in front))
    harmful = format_prompts(loaded.tokenizer, load_prompts(identity["harmful"], split=args.split)[: args.limit],
                             identity["system_prompt"])
    judge, tokens = get_judge(identity["judge"]), identity["max_new_tokens"]

    start = time.perf_counter()
    base = measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, judge, tokens, args.batch_size).verdicts
    answered = [i for i, refused in enumerate(base) if not refused]
    print(f"base: {sum(base)}/{len(base)} refusals ({time.perf_counter() - start:.0f} s)")
    for trial in chosen:
        params = AblationParams.from_dict(trial.user_attrs["params"])
        with ablate(plan_edits(loaded.adapter, directions.directions, params), params.norm_preserving):
            result = measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, judge, tokens, args.batch_size)
        turned = [i for i in answered if result.verdicts[i]]
        kept = sum(result.verdicts[i] for i, refused in enumerate(base) if refused)
        print(f"trial {trial.number} (tune {trial.values[0]:.0f} refusals, KL {trial.values[1]:.3f}): {result.refusals}/"
              f"{len(base)} refusals; of the {len(answered)} the base answers {len(turned)} refused, of the "
              f"{sum(base)} it refuses {kept} still refused")
        for i in turned:
            print(f"    now refused: {result.responses[i][:120]!r}")


if __name__ == "__main__":
    main()
