"""Benchmark: prepacked linear weights (packed.py) against the plain modules, in one run.

    python bench/packed.py [--model tiny] [--dtype float32] [--prompts 24] [--max-new-tokens 32] [--batch-size 32]
                           [--repeats 2]

1. One weight matrix of the model's MLP (and its LM head) at 1-32 rows: ms per product, plain and packed.
2. A search trial's work without its early decisions: greedy generation of the harmful tune prompts, and the
   first-token pass over as many benign tune prompts -- plain, packed, plain, packed... (the best of --repeats each),
   with the packed answers compared token for token with the plain ones and the log-probabilities' largest gap.
"""

from __future__ import annotations

import torch

import harness
from abliterate.core.load import load_model
from abliterate.core.prompts import format_prompts, load_prompts
from abliterate.measure.engines.packed import _PackedForward, packed_linears
from abliterate.measure.engines.transformers import generate, next_token_logprobs


def matrix_products(model) -> dict:
    """ms per product, plain and packed, of the largest MLP matrix and the LM head at 1-32 rows."""
    figures = {}
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for label, module in (("largest MLP matrix", max(linears[:-1], key=lambda m: m.weight.numel())),
                          ("LM head", linears[-1])):
        pack = _PackedForward(module).original_pack

        def packed(x, module=module, pack=pack):  # the packed product itself, at any row count
            return torch.ops.mkldnn._linear_pointwise(x, pack, module.bias, "none", [], "")
        print(f"{label} {tuple(module.weight.shape)}: rows  plain ms  packed ms  ratio")
        by_rows = {}
        for rows in (1, 2, 3, 4, 8, 16, 24, 32):
            x = torch.randn(rows, module.in_features, dtype=module.weight.dtype)
            plain_ms = harness.per_call(lambda x=x, m=module: torch.nn.functional.linear(x, m.weight, m.bias)) * 1e3
            packed_ms = harness.per_call(lambda x=x, p=packed: p(x)) * 1e3
            by_rows[rows] = {"plain_ms": plain_ms, "packed_ms": packed_ms}
            print(f"  {rows:>4} {plain_ms:>9.2f} {packed_ms:>10.2f} {harness.ratio(plain_ms, packed_ms):>6.2f}x")
        figures[label] = {"shape": list(module.weight.shape), "rows": by_rows}
    return figures


def main():
    parser = harness.parser(__doc__, repeats=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"{args.model}, {loaded.dtype}, {torch.get_num_threads()} threads")
    products = matrix_products(model)

    harmful = format_prompts(tokenizer, load_prompts("harmful", split="tune")[: args.prompts])
    benign = format_prompts(tokenizer, load_prompts("harmless", split="tune")[: args.prompts])
    generate(model, tokenizer, harmful[:4], 2, args.batch_size)  # warm-up

    def trial_work(packed: bool) -> tuple[harness.Timed, harness.Timed]:
        """Generation and first-token pass, each timed inside the block (packing the weights is not timed)."""
        with packed_linears(model, enabled=packed) as active:
            assert active == packed, "nothing was packed (no oneDNN, not float32 on the CPU, or too little memory)"
            return harness.alternate({
                "generation": lambda: generate(model, tokenizer, harmful, args.max_new_tokens, args.batch_size).tokens,
                "first-token pass": lambda: next_token_logprobs(model, tokenizer, benign, args.batch_size),
            }, repeats=1)

    sides = harness.alternate({"plain": lambda: trial_work(False), "packed": lambda: trial_work(True)}, args.repeats)

    def best(side: str, part: str) -> float:
        return min(run[part].best for run in sides[side].values)

    def first(side: str, part: str):
        return sides[side].values[0][part].values[0]

    plain_generation, packed_generation = best("plain", "generation"), best("packed", "generation")
    plain_pass, packed_pass = best("plain", "first-token pass"), best("packed", "first-token pass")
    same = sum(a == b for a, b in zip(first("plain", "generation"), first("packed", "generation")))
    gap = float((first("plain", "first-token pass") - first("packed", "first-token pass")).abs().max())
    generation_speedup = harness.ratio(plain_generation, packed_generation)
    print(f"generation, {len(harmful)} prompts x {args.max_new_tokens} tokens: plain {plain_generation:.2f} s, "
          f"packed {packed_generation:.2f} s, {generation_speedup:.2f}x; "
          f"same tokens {same}/{len(harmful)}")
    print(f"first-token pass, {len(benign)} prompts: plain {plain_pass:.2f} s, packed {packed_pass:.2f} s, "
          f"{harness.ratio(plain_pass, packed_pass):.2f}x; largest log-prob gap {gap:.1e}")
    harness.record("packed", {
        "model": args.model, "dtype": str(loaded.dtype), "prompts": len(harmful), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "matrix_products": products,
        "generation_s": {"plain": plain_generation, "packed": packed_generation}, "generation_speedup": generation_speedup,
        "same_tokens": same, "first_token_pass_s": {"plain": plain_pass, "packed": packed_pass},
        "first_token_pass_speedup": harness.ratio(plain_pass, packed_pass), "largest_logprob_gap": gap,
    }, title="prepacked weights", path=args.json,
        headline=f"generation of {len(harmful)} prompts × {args.max_new_tokens} tokens {plain_generation:.2f} → "
                 f"{packed_generation:.2f} s ({generation_speedup:.2f}x), same tokens {same}/{len(harmful)}")


if __name__ == "__main__":
    main()
