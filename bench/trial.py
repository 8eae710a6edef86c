"""Benchmark: seconds per search trial and their breakdown, against the forward-pass floor of the same work.

    python bench/trial.py [--model tiny] [--trials 6] [--tune-prompts 48] [--max-new-tokens 32] [--decode dynamic,static]

A trial = plan + apply the edit (hooks) + first-token KL on the benign tune prompts + refusal generation
with early decision, exactly as `abliterate run` does it (layers below the first edited one reused from the
base model; on a CPU in float32 the linear weights prepacked, packed.py; `--no-packed`: plain modules). The floor
is what the same tokens cost through the bare model (plain modules) with no reuse: one forward pass over the benign
prompts, plus a prefill and one cached decode step per generated token. Each trial is also measured without prefix
reuse, so the two show what reuse saves. All in one run, so ratios hold on any CPU.
`--decode A,B`: each trial's generation is also run with the other decoding (evaluate.generate's `decode`: dynamic,
static = fixed shapes and CUDA graphs on a GPU), timed, and its answers compared with the first's.
"""

from __future__ import annotations

import time

import optuna
import torch

import harness
from abliterate.measure.ablation import ablate, plan_edits
from abliterate.core.settings import SearchSpace
from abliterate.measure.directions import measure_directions
from abliterate.measure.evaluate import Baseline, measure_refusals
from abliterate.measure.engines.transformers import generate
from abliterate.core.judges import DEFAULT_JUDGE, get_judge, judge_refusals
from abliterate.measure.engines.packed import packed_linears
from abliterate.measure.engines.prefix import PrefixCache
from abliterate.core.load import load_model
from abliterate.core.prompts import format_prompts, load_prompts
from abliterate.search.study import suggest_params
from abliterate.measure.engines.transformers import TransformersEngine


def random_model(folder: str) -> str:
    """A copy of `folder` with random weights written beside its config and tokenizer (a model too big to carry)."""
    import tempfile

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.bfloat16)
    out = tempfile.mkdtemp(prefix="random-")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


def parse_args():
    parser = harness.parser(__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--tune-prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--judge", default=DEFAULT_JUDGE)
    parser.add_argument("--decode", default="auto", help="auto, dynamic, static, or two of them to compare: dynamic,static")
    parser.add_argument("--random-init", action="store_true",
                        help="--model is a folder with a config and a tokenizer only: time that architecture with random "
                             "weights (the same cost per step as the real model; the answers are noise)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-packed", dest="packed", action="store_false",
                        help="trials through the plain linear modules (run packs them on a CPU in float32, packed.py)")
    return parser.parse_args()


def main():
    args = parse_args()
    loaded = load_model(random_model(args.model) if args.random_init else args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = TransformersEngine(model, tokenizer)
    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:64],
                                    load_prompts("harmless", split="train")[:64]).directions
    harmful = format_prompts(tokenizer, load_prompts("harmful", split="tune")[: args.tune_prompts])
    benign = format_prompts(tokenizer, load_prompts("harmless", split="tune")[: args.tune_prompts])
    baseline = Baseline.measure(engine, benign, kl_tokens=0, batch_size=args.batch_size)
    judge = get_judge(args.judge)
    harmful_prefix = PrefixCache()
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    decodes = args.decode.split(",")
    rows, other_seconds, same_answers = [], [], 0
    for _ in range(args.trials):
        trial = study.ask()
        start = time.perf_counter()
        params = suggest_params(trial, SearchSpace(), loaded.adapter.n_layers)
        edits = plan_edits(loaded.adapter, directions, params)
        first_edited = min((edit.component.layer for edit in edits), default=loaded.adapter.n_layers)
        with packed_linears(model, enabled=args.packed), ablate(edits, params.norm_preserving):
            t_plan = time.perf_counter()
            kl = baseline.kl(engine, args.batch_size, first_edited)
            t_kl = time.perf_counter()
            result = measure_refusals(engine, harmful, judge, args.max_new_tokens, args.batch_size,
                                      first_edited_layer=first_edited, prefix=harmful_prefix, decode=decodes[0])
            t_gen = time.perf_counter()
            judge_refusals(judge, result.responses)  # the verdicts alone, as measure_refusals ends with them
            judging = time.perf_counter() - t_gen
            t_gen_end = time.perf_counter()
            baseline.kl(engine, args.batch_size)  # the same trial without prefix reuse
            measure_refusals(engine, harmful, judge, args.max_new_tokens, args.batch_size)
            no_reuse = time.perf_counter() - t_gen_end + (t_plan - start)
            if len(decodes) > 1:  # the same generation with the other decoding
                t_other = time.perf_counter()
                other = measure_refusals(engine, harmful, judge, args.max_new_tokens, args.batch_size,
                                         first_edited_layer=first_edited, prefix=harmful_prefix, decode=decodes[1])
                other_seconds.append(time.perf_counter() - t_other)
                same_answers += sum(a == b for a, b in zip(result.responses, other.responses))
                print(f"  generation with decode={decodes[1]}: {other_seconds[-1]:.2f} s, {other.refusals} refusals "
                      f"(decode={decodes[0]}: {t_gen - t_kl:.2f} s, {result.refusals} refusals)")
        decode_tokens = result.tokens_generated
        # The floor: the same number of prompt and decode tokens through the bare model, no hooks, no judge.
        floor_start = time.perf_counter()
        baseline.kl(engine, args.batch_size)
        generate(model, tokenizer, harmful, max(1, round(decode_tokens / len(harmful))), args.batch_size, decode="dynamic")
        floor = time.perf_counter() - floor_start
        study.tell(trial, [result.refusals, kl])
        rows.append((t_plan - start, t_kl - t_plan, t_gen - t_kl, floor, no_reuse))
        print(f"trial {trial.number}: {t_gen - start:6.1f} s (edit {t_plan - start:.2f}, KL {t_kl - t_plan:.1f}, "
              f"generation {t_gen - t_kl:.1f}, of which verdicts {judging:.2f}; first edited layer {first_edited}); without reuse {no_reuse:.1f} s; "
              f"floor {floor:.1f} s; refusals {result.refusals}/{len(harmful)}, KL {kl:.3f}, "
              f"decode tokens saved {result.tokens_saved}")
    report(args, loaded, judge, rows, decodes, other_seconds, same_answers, len(harmful))


def report(args, loaded, judge, rows: list[tuple], decodes: list[str], other_seconds: list[float], same_answers: int,
           n_prompts: int) -> None:
    """The means over the trials, printed and recorded ("trial"; "decode" when two decodings were compared)."""
    total = sum(r[0] + r[1] + r[2] for r in rows) / len(rows)
    floor = sum(r[3] for r in rows) / len(rows)
    no_reuse = sum(r[4] for r in rows) / len(rows)
    print(f"model {args.model} ({loaded.dtype}), {torch.get_num_threads()} threads, judge {judge.name}, "
          f"{args.tune_prompts}+{args.tune_prompts} prompts, {args.max_new_tokens} new tokens: {total:.1f} s per trial "
          f"({no_reuse:.1f} s without prefix reuse: {harness.ratio(no_reuse, total):.2f}x), floor {floor:.1f} s: "
          f"{harness.ratio(total, floor):.2f}x the floor; {3600 / total:.0f} trials/hour")
    figures = {"model": args.model, "dtype": str(loaded.dtype), "judge": judge.name, "trials": len(rows),
               "tune_prompts": args.tune_prompts, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
               "packed": args.packed, "random_init": args.random_init, "seconds_per_trial": total,
               "seconds_without_reuse": no_reuse, "reuse_speedup": harness.ratio(no_reuse, total),
               "floor_seconds": floor, "times_floor": harness.ratio(total, floor), "trials_per_hour": 3600 / total}
    headline = (f"{total:.1f} s per trial, {harness.ratio(total, floor):.2f}x the forward-pass floor ({floor:.1f} s); "
                f"{3600 / total:.0f} trials/hour")
    if not other_seconds:
        harness.record("trial", figures, title="search trial against its floor", headline=headline, path=args.json)
        return
    generation = sum(r[2] for r in rows) / len(rows)
    other = sum(other_seconds) / len(other_seconds)
    answers = len(rows) * n_prompts
    print(f"generation per trial: decode={decodes[0]} {generation:.2f} s, decode={decodes[1]} {other:.2f} s "
          f"({harness.ratio(generation, other):.2f}x); identical answers {same_answers}/{answers}")
    figures.update(decode=decodes, generation_seconds={decodes[0]: generation, decodes[1]: other},
                   decode_speedup=harness.ratio(generation, other), identical_answers=same_answers, answers=answers)
    harness.record("decode", figures, title="fixed-shape decoding", path=args.json,
                   headline=f"identical answers {same_answers}/{answers}; generation with {decodes[1]} "
                            f"{harness.ratio(generation, other):.2f}x as fast as {decodes[0]}")


if __name__ == "__main__":
    main()
