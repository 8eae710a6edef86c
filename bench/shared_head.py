"""The shared prompt head (src/abliterate/measure/engines/transformers.py: `_head_cache`): a search trial's two prompt passes -- the
first-token KL pass over the benign tune prompts and the prefill of the harmful ones -- with the tokens every prompt
opens with (chat header, system prompt) computed once for one row, against whole prompts; same run, alternating,
best of `--repeats`; the log-probs and the first generated tokens compared.

    python bench/shared_head.py [--model tiny] [--prompts 32] [--dtype float32] [--repeats 4]
"""

from __future__ import annotations

import torch

import abliterate.measure.engines.transformers as evaluation
import harness
from abliterate.core.load import load_model
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts, load_prompts


def main() -> None:
    parser = harness.parser(__doc__, repeats=4)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=32, help="tune prompts of each set")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=32)
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

    def kl_pass(shared: bool):
        evaluation.SHARE_HEAD = shared
        return evaluation.next_token_logprobs(model, tokenizer, benign, args.batch_size)

    def prefill(shared: bool):
        evaluation.SHARE_HEAD = shared
        return evaluation.generate(model, tokenizer, harmful, 1, args.batch_size).tokens

    timings = harness.alternate({
        ("KL pass (benign)", False): lambda: kl_pass(False), ("prefill (harmful)", False): lambda: prefill(False),
        ("KL pass (benign)", True): lambda: kl_pass(True), ("prefill (harmful)", True): lambda: prefill(True),
    }, args.repeats)
    speedups = {}
    for label in ("KL pass (benign)", "prefill (harmful)"):
        whole, shared = timings[label, False].best, timings[label, True].best
        speedups[label] = {"whole_s": whole, "shared_s": shared, "speedup": harness.ratio(whole, shared)}
        print(f"{label:<18} whole prompts {whole:6.2f} s   shared head {shared:6.2f} s   {whole / shared:.2f}x")
    difference = (timings["KL pass (benign)", True].values[-1]
                  - timings["KL pass (benign)", False].values[-1]).abs().max().item()
    identical = timings["prefill (harmful)", True].values[-1] == timings["prefill (harmful)", False].values[-1]
    print(f"max |log-prob difference| {difference:.1e}; first tokens identical: {identical}")
    kl, prefill_speedup = speedups["KL pass (benign)"]["speedup"], speedups["prefill (harmful)"]["speedup"]
    harness.record("shared_head", {
        "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "prompts": len(benign),
        "tokens": tokens, "head_tokens": head, "kl_pass": speedups["KL pass (benign)"],
        "prefill": speedups["prefill (harmful)"], "max_logprob_difference": difference, "first_tokens_identical": identical,
    }, title="shared prompt head", path=args.json,
        headline=f"KL pass {kl:.2f}x, harmful prefill {prefill_speedup:.2f}x faster, log-probs within {difference:.1e}"
                 f"{'' if identical else ', first tokens differ'}")


if __name__ == "__main__":
    main()
