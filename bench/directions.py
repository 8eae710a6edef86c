"""Benchmark: direction measurement against a bare batched forward pass over the same prompts, same run.

    python bench/directions.py [--model tiny] [--prompts 64] [--batch-size 16] [--dtype auto] [--repeats 2]

Prints tokens/s of both and their ratio (target >= 0.8x), and the peak RSS of this process against the
model's bytes in its working dtype (target <= 1.3x). Also the bf16/fp32 matmul speed ratio that
`--dtype auto` decides by on CPU.
"""

from __future__ import annotations

import torch

import harness
from abliterate.core.load import cpu_bf16_speedup, load_model
from abliterate.core.prompts import format_prompts, load_prompts
from abliterate.measure.directions import mean_last_token_residuals


def bare_forward(model, tokenizer, prompts, batch_size):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [prompts[i] for i in order[start:start + batch_size]]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            model(**inputs, use_cache=False)


def main():
    parser = harness.parser(__doc__, repeats=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=64, help="per set (harmful, harmless)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = format_prompts(tokenizer, load_prompts("harmful", split="train")[:args.prompts]
                             + load_prompts("harmless", split="train")[:args.prompts])
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # Peak memory of loading + measuring, taken before the bare forward (whose logits are large) ever runs.
    mean_last_token_residuals(model, tokenizer, loaded.adapter, prompts, args.batch_size)
    peak_rss = harness.peak_rss()
    timings = harness.alternate({
        "bare forward": lambda: bare_forward(model, tokenizer, prompts, args.batch_size),
        "directions": lambda: mean_last_token_residuals(model, tokenizer, loaded.adapter, prompts, args.batch_size),
    }, args.repeats)
    best = {name: timing.best for name, timing in timings.items()}
    bf16_speedup = cpu_bf16_speedup()

    print(f"cpu: {harness.cpu_name()}, {torch.get_num_threads()} threads; model {args.model} in {loaded.dtype} "
          f"(bf16/fp32 matmul speed on this CPU: {bf16_speedup:.2f}x)")
    print(f"{len(prompts)} prompts, {n_tokens} tokens, batch {args.batch_size}")
    for name, seconds in best.items():
        print(f"  {name:<13} {seconds:7.2f} s  {n_tokens / seconds:9.0f} tokens/s")
    throughput = harness.ratio(best["bare forward"], best["directions"])
    rss_ratio = harness.ratio(peak_rss, model_bytes)
    print(f"throughput ratio directions / bare forward: {throughput:.2f}x (target >= 0.8x)")
    print(f"peak RSS (load + directions) {peak_rss / 2**30:.2f} GiB vs model {model_bytes / 2**30:.2f} GiB: "
          f"{rss_ratio:.2f}x (target <= 1.3x)")
    harness.record("directions", {
        "model": args.model, "dtype": str(loaded.dtype), "prompts": len(prompts), "tokens": n_tokens,
        "batch_size": args.batch_size, "seconds": best, "tokens_per_s": n_tokens / best["directions"],
        "throughput_ratio": throughput, "peak_rss_bytes": peak_rss, "model_bytes": model_bytes,
        "peak_rss_ratio": rss_ratio, "bf16_fp32_matmul_speedup": bf16_speedup,
    }, title="directions", path=args.json,
        headline=f"{n_tokens / best['directions']:.0f} tokens/s, {throughput:.2f}x a bare forward pass; "
                 f"peak RSS {rss_ratio:.2f}x the model")


if __name__ == "__main__":
    main()
