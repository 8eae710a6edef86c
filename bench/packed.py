"""Benchmark: prepacked linear weights (packed.py) against the plain modules, in one run.

    python bench/packed.py [--model tiny] [--dtype float32] [--prompts 24] [--max-new-tokens 32] [--batch-size 32]

1. One weight matrix of the model's MLP (and its LM head) at 1-32 rows: ms per product, plain and packed.
2. A search trial's work without its early decisions: greedy generation of the harmful tune prompts, and the
   first-token pass over as many benign tune prompts -- plain, packed, plain, packed (the better of two each),
   with the packed answers compared token for token with the plain ones and the log-probabilities' largest gap.
"""

from __future__ import annotations

import argparse
import time

import torch

from abliterate.measure.engines.transformers import generate, next_token_logprobs
from abliterate.core.load import load_model
from abliterate.measure.engines.packed import _PackedForward, packed_linears
from abliterate.core.prompts import format_prompts, load_prompts


def per_call_ms(function, repeats: int = 30) -> float:
    for _ in range(3):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser()
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

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for label, module in (("largest MLP matrix", max(linears[:-1], key=lambda m: m.weight.numel())),
                          ("LM head", linears[-1])):
        pack = _PackedForward(module).original_pack

        def packed(x, module=module, pack=pack):  # the packed product itself, at any row count
            return torch.ops.mkldnn._linear_pointwise(x, pack, module.bias, "none", [], "")
        print(f"{label} {tuple(module.weight.shape)}: rows  plain ms  packed ms  ratio")
        for rows in (1, 2, 3, 4, 8, 16, 24, 32):
            x = torch.randn(rows, module.in_features, dtype=module.weight.dtype)
            plain_ms = per_call_ms(lambda x=x, m=module: torch.nn.functional.linear(x, m.weight, m.bias))
            packed_ms = per_call_ms(lambda x=x, p=packed: p(x))
            print(f"  {rows:>4} {plain_ms:>9.2f} {packed_ms:>10.2f} {plain_ms / packed_ms:>6.2f}x")

    harmful = format_prompts(tokenizer, load_prompts("harmful", split="tune")[: args.prompts])
    benign = format_prompts(tokenizer, load_prompts("harmless", split="tune")[: args.prompts])
    generate(model, tokenizer, harmful[:4], 2, args.batch_size)  # warm-up

    def measure() -> tuple[float, float, list, torch.Tensor]:
        start = time.perf_counter()
        tokens = generate(model, tokenizer, harmful, args.max_new_tokens, args.batch_size).tokens
        generation = time.perf_counter() - start
        start = time.perf_counter()
        logprobs = next_token_logprobs(model, tokenizer, benign, args.batch_size)
        return generation, time.perf_counter() - start, tokens, logprobs

    results = {False: [], True: []}
    for packed in (False, True, False, True):
        if packed:
            with packed_linears(model) as active:
                assert active, "nothing was packed (no oneDNN, not float32 on the CPU, or too little memory)"
                results[True].append(measure())
        else:
            results[False].append(measure())
    plain_generation = min(r[0] for r in results[False])
    packed_generation = min(r[0] for r in results[True])
    plain_pass = min(r[1] for r in results[False])
    packed_pass = min(r[1] for r in results[True])
    same = sum(a == b for a, b in zip(results[False][0][2], results[True][0][2]))
    gap = float((results[False][0][3] - results[True][0][3]).abs().max())
    print(f"generation, {len(harmful)} prompts x {args.max_new_tokens} tokens: plain {plain_generation:.2f} s, "
          f"packed {packed_generation:.2f} s, {plain_generation / packed_generation:.2f}x; "
          f"same tokens {same}/{len(harmful)}")
    print(f"first-token pass, {len(benign)} prompts: plain {plain_pass:.2f} s, packed {packed_pass:.2f} s, "
          f"{plain_pass / packed_pass:.2f}x; largest log-prob gap {gap:.1e}")


if __name__ == "__main__":
    main()
