"""Does a run's tune-split front hold out? Each chosen trial of a finished `abliterate run`, measured on the held-out
eval split as a trial is measured (its ablation applied by hooks, no bake): refusals on the split's harmful prompts,
first-token KL on its benign prompts (at most 100). Marks the trial `--pick auto` saves and the one with the fewest
tune refusals, which `auto` saved before it became the one-standard-error rule (src/abliterate/search/pick.py).

    python bench/experiments/front_heldout.py RUN_DIR [--trials 0,48,43] [--prompts 154]

Default trials: the whole Pareto front. The model, dtype, judge, system prompt and new-token budget are the run's
own (RUN_DIR/run.json), the directions its directions.safetensors.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from normalisation import measure_realised

from abliterate.measure.ablation import AblationParams, plan_edits
from abliterate.measure.directions import Directions
from abliterate.measure.evaluate import Baseline
from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts
from abliterate.choose.report import load_study_readonly
from abliterate.search.study import pareto_front, pick_trial
from abliterate.measure.engines.transformers import TransformersEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--trials", help="comma-separated trial numbers (default: the Pareto front)")
    parser.add_argument("--prompts", type=int, default=154, help="harmful prompts of the eval split")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    identity = json.loads((args.run_dir / "run.json").read_text())["identity"]
    study = load_study_readonly(args.run_dir / "study.journal")
    tune_total = identity["tune_prompts"]
    front = pareto_front(study)
    auto, fewest = pick_trial(study, "auto", tune_total).number, front[0].number
    numbers = [int(n) for n in args.trials.split(",")] if args.trials else [t.number for t in front]

    loaded = load_model(identity["model"], dtype=identity["dtype"])
    directions = Directions.load(args.run_dir / "directions.safetensors").fitted_to(loaded.adapter).directions
    system_prompt = DEFAULT_SYSTEM_PROMPT if identity.get("system_prompt") is None else identity["system_prompt"]

    def fmt(prompts):
        return format_prompts(loaded.tokenizer, prompts, system_prompt)

    harmful = fmt(load_prompts(identity["harmful"], split="eval")[:args.prompts])
    benign = fmt(load_prompts(identity["harmless"], split="eval")[:min(args.prompts, 100)])
    baseline = Baseline.measure(TransformersEngine(loaded.model, loaded.tokenizer), benign, 0, batch_size=args.batch_size)
    judge = get_judge(identity["judge"])
    print(f"{args.run_dir}: {identity['model']}, {identity['dtype']}, judge {judge.name}; held out: {len(harmful)} "
          f"harmful, {len(benign)} benign prompts")
    for number in numbers:
        trial = study.trials[number]
        params = AblationParams.from_dict(trial.user_attrs["params"])
        start = time.perf_counter()
        refusals, kl = measure_realised(loaded, plan_edits(loaded.adapter, directions, params), "none", baseline, harmful,
                                        judge, identity["max_new_tokens"], args.batch_size, params.norm_preserving)
        marks = ", ".join(name for name, chosen in (("auto", auto), ("fewest tune refusals", fewest))
                          if chosen == number)
        print(f"trial {number:3d}: tune {int(trial.values[0])}/{tune_total} KL {trial.values[1]:.3f} -> held out "
              f"{refusals}/{len(harmful)} KL {kl:.3f}  {time.perf_counter() - start:4.0f} s"
              + (f"  ({marks})" if marks else ""), flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
