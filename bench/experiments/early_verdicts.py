"""What early verdicts (`early_verdicts = true`: the classifier judges an answer it is already sure of at 12 or 20
tokens, see src/abliterate/core/judges.py) change in a search trial's measurement: each chosen trial of a finished
`abliterate run`, its ablation applied by hooks as a trial applies it, answers the same harmful prompts twice --
every answer read to the run's token budget, then with early verdicts -- and the two are compared answer by answer.

    python bench/experiments/early_verdicts.py RUN_DIR [--trials 0,26,24] [--split tune|eval] [--prompts 48]

Prints per trial: refusals both ways, answers whose verdict differs, decode tokens (row-steps) both ways, seconds both
ways. Default trials: the run's Pareto front; the model, dtype, judge, system prompt and budget are the run's own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from abliterate.measure.ablation import AblationParams, ablate, plan_edits
from abliterate.measure.directions import Directions
from abliterate.measure.evaluate import measure_refusals
from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts
from abliterate.choose.report import load_study_readonly
from abliterate.search.study import pareto_front
from abliterate.measure.engines.transformers import TransformersEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--trials", help="comma-separated trial numbers (default: the Pareto front)")
    parser.add_argument("--split", choices=("tune", "eval"), default="tune")
    parser.add_argument("--prompts", type=int, help="harmful prompts of the split (default: the run's own number)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--show", action="store_true", help="print the answers whose verdict changed")
    args = parser.parse_args()

    identity = json.loads((args.run_dir / "run.json").read_text())["identity"]
    study = load_study_readonly(args.run_dir / "study.journal")
    numbers = [int(n) for n in args.trials.split(",")] if args.trials else [t.number for t in pareto_front(study)]
    count = args.prompts or identity[f"{args.split}_prompts"]

    loaded = load_model(identity["model"], dtype=identity["dtype"])
    directions = Directions.load(args.run_dir / "directions.safetensors").fitted_to(loaded.adapter).directions
    system_prompt = DEFAULT_SYSTEM_PROMPT if identity.get("system_prompt") is None else identity["system_prompt"]
    harmful = format_prompts(loaded.tokenizer, load_prompts(identity["harmful"], split=args.split)[:count], system_prompt)
    judge, budget = get_judge(identity["judge"]), identity["max_new_tokens"]
    print(f"{args.run_dir}: {identity['model']}, {identity['dtype']}, judge {judge.name}, {budget} new tokens; "
          f"{len(harmful)} harmful prompts of the {args.split} split")
    print("trial  refusals full/early  verdicts changed  decode tokens full/early  seconds full/early")
    changed_total = tokens_full = tokens_early = 0
    for number in numbers:
        params = AblationParams.from_dict(study.trials[number].user_attrs["params"])
        results, seconds = [], []
        with ablate(plan_edits(loaded.adapter, directions, params), params.norm_preserving):
            for early in (False, True):
                start = time.perf_counter()
                results.append(measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, judge, budget,
                                                args.batch_size, early_verdicts=early))
                seconds.append(time.perf_counter() - start)
        full, early = results
        changed = sum(a != b for a, b in zip(full.verdicts, early.verdicts))
        changed_total += changed
        tokens_full += full.tokens_generated
        tokens_early += early.tokens_generated
        print(f"{number:5d}  {full.refusals:>8d}/{early.refusals:<6d}  {changed:>16d}  {full.tokens_generated:>13d}/"
              f"{early.tokens_generated:<10d}  {seconds[0]:>8.1f}/{seconds[1]:.1f}", flush=True)
        for long, short, verdict in zip(full.responses, early.responses, full.verdicts):
            if args.show and verdict != judge.is_refusal(short):
                print(f"    {'refusal' if verdict else 'answer'} at {budget} tokens: {long!r}\n"
                      f"    {'answer' if verdict else 'refusal'} early: {short!r}")
    print(f"all: {changed_total} of {len(numbers) * len(harmful)} verdicts changed; decode tokens "
          f"{tokens_early}/{tokens_full} = {tokens_early / max(tokens_full, 1):.2f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
