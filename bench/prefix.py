"""Benchmark: prefix reuse — seconds per KL pass and per refusal-generation pass, full vs reused, by first edited layer.

    python bench/prefix.py [--model tiny] [--prompts 48] [--max-new-tokens 16] [--batch-size 16] [--repeats 5]

Without --model: a random llama (hidden 256, 12 layers, float32) and the tests' byte-level tokenizer, on the bundled
prompts cut to ~40-50 tokens — no download. A trial's first edited layer L0 = 0, n/4, n/2: the cache is filled
first (as earlier trials would), then both ways are timed and checked to agree.
Times are the best of --repeats, interleaved (a shared machine is noisy).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

import harness
from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, ablate, plan_edits
from abliterate.core.arch import adapter_for
from abliterate.measure.engines.transformers import generate, next_token_logprobs
from abliterate.measure.engines.prefix import PrefixCache
from abliterate.core.prompts import format_prompts, load_prompts


def random_llama():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model("llama", hidden_size=256, intermediate_size=688, num_hidden_layers=12,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    tokenizer = build_tiny_tokenizer()
    prompts = load_prompts("harmful", split="tune")
    return model, tokenizer, lambda n: [f"<|user|>{p[:12 + i % 12]}<|end|><|assistant|>" for i, p in enumerate(prompts[:n])]


def main():
    parser = harness.parser(__doc__, repeats=5)
    parser.add_argument("--model", default=None, help="e.g. tiny (default: a random llama, nothing to download)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.model:
        from abliterate.core.load import load_model

        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        prompts = format_prompts(tokenizer, load_prompts("harmful", split="tune")[:args.prompts])
    else:
        model, tokenizer, make_prompts = random_llama()
        prompts = make_prompts(args.prompts)
    adapter = adapter_for(model)
    n, bs = adapter.n_layers, args.batch_size
    directions = torch.nn.functional.normalize(torch.randn(n, adapter.hidden_size), dim=-1)
    tokens = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    print(f"{adapter.model_type}, {n} layers x {adapter.hidden_size}, {next(model.parameters()).dtype}, "
          f"{len(prompts)} prompts of {min(tokens)}-{max(tokens)} tokens, batch {bs}, {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'L0':>3} | {'KL full':>8} {'reuse':>8} {'x':>5} | {'gen full':>8} {'reuse':>8} {'x':>5} | kept MiB")
    next_token_logprobs(model, tokenizer, prompts, bs), generate(model, tokenizer, prompts, 2, bs)  # warm-up
    by_layer = {}
    for first in sorted({0, n // 4, n // 2}):
        kernel = Kernel(1.0, n - 1, 0.5, n - 1 - first + 0.5)  # edits layers first..n-1
        params = AblationParams({kind: ComponentParams((n - 1) * 0.6, kernel) for kind in ("attn", "mlp")})
        edits = plan_edits(adapter, directions, params)
        assert min(edit.component.layer for edit in edits) == first
        kl_full = partial(next_token_logprobs, model, tokenizer, prompts, bs)
        kl_reuse = partial(next_token_logprobs, model, tokenizer, prompts, bs, first, PrefixCache())
        gen_full = partial(generate, model, tokenizer, prompts, args.max_new_tokens, bs)
        gen_reuse = partial(generate, model, tokenizer, prompts, args.max_new_tokens, bs, None, first, PrefixCache())
        with ablate(edits):
            for _ in range(2):  # plan, then fill: what the first trials of a search do
                kl_reuse(), gen_reuse()
            torch.testing.assert_close(kl_reuse(), kl_full(), atol=1e-4, rtol=0)
            assert gen_reuse().tokens == gen_full().tokens
            timings = harness.alternate({"kl_full": kl_full, "kl_reuse": kl_reuse, "gen_full": gen_full,
                                         "gen_reuse": gen_reuse}, args.repeats)
        times = [timing.best for timing in timings.values()]
        kept = (kl_reuse.args[-1].used + gen_reuse.args[-1].used) / 2**20
        print(f"{first:>3} | {times[0]:8.3f} {times[1]:8.3f} {times[0] / times[1]:5.2f} | "
              f"{times[2]:8.3f} {times[3]:8.3f} {times[2] / times[3]:5.2f} | {kept:.1f}")
        by_layer[first] = {**{name: timing.best for name, timing in timings.items()},
                           "kl_speedup": harness.ratio(times[0], times[1]),
                           "gen_speedup": harness.ratio(times[2], times[3]), "kept_mib": kept}
    layers = " / ".join(str(first) for first in by_layer)
    kl, gen = (" / ".join(f"{row[key]:.2f}x" for row in by_layer.values()) for key in ("kl_speedup", "gen_speedup"))
    harness.record("prefix", {
        "model": args.model or "random llama", "layers": n, "prompts": len(prompts), "batch_size": bs,
        "max_new_tokens": args.max_new_tokens, "by_first_edited_layer": by_layer,
    }, title="prefix reuse", path=args.json,
        headline=f"KL pass {kl}, generation {gen} faster with the first edit at layer {layers} of {n}; "
                 "results identical")


if __name__ == "__main__":
    main()
