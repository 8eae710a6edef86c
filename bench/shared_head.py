"""The shared prompt head (src/abliterate/measure/engines/transformers.py: `_head_cache`): a search trial's two prompt passes -- the
first-token KL pass over the benign tune prompts and the prefill of the harmful ones -- with the tokens every prompt
opens with (chat header, system prompt) computed once for one row, against whole prompts; same run, alternating,
best of `--repeats`; the log-probs and the first generated tokens compared.

    python bench/shared_head.py [--model tiny] [--prompts 32] [--dtype float32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import time

import torch

import abliterate.measure.engines.transformers as evaluation
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=32, help="tune prompts of each set")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer

    def fmt(name: str) -> list[str]:
        return format_prompts(tokenizer, load_prompts(name, split="tune")[:args.prompts], DEFAULT_SYSTEM_PROMPT)

    benign, harmful = fmt("harmless"), fmt("harmful")
    head = evaluation._head_length(tokenizer, tuple(benign))
    tokens = sum(len(evaluation._token_ids(tokenizer, text)) for text in benign + harmful)
    print(f"{args.model}, {args.dtype}, batch {args.batch_size}: {len(benign)} benign + {len(harmful)} harmful prompts, "
          f"{tokens} tokens, shared head {head} tokens per prompt")
    seconds = {False: ([], []), True: ([], [])}
    outputs = {}
    for _ in range(args.repeats):
        for shared in (False, True):
            evaluation.SHARE_HEAD = shared
            start = time.perf_counter()
            logprobs = evaluation.next_token_logprobs(model, tokenizer, benign, args.batch_size)
            middle = time.perf_counter()
            first = evaluation.generate(model, tokenizer, harmful, 1, args.batch_size).tokens
            seconds[shared][0].append(middle - start)
            seconds[shared][1].append(time.perf_counter() - middle)
            outputs[shared] = logprobs, first
    for label, index in (("KL pass (benign)", 0), ("prefill (harmful)", 1)):
        whole, shared = min(seconds[False][index]), min(seconds[True][index])
        print(f"{label:<18} whole prompts {whole:6.2f} s   shared head {shared:6.2f} s   {whole / shared:.2f}x")
    difference = (outputs[True][0] - outputs[False][0]).abs().max().item()
    print(f"max |log-prob difference| {difference:.1e}; first tokens identical: {outputs[True][1] == outputs[False][1]}")


if __name__ == "__main__":
    main()
