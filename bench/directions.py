"""Benchmark: direction measurement against a bare batched forward pass over the same prompts, same run.

    python bench/directions.py [--model tiny] [--prompts 64] [--batch-size 16] [--dtype auto]

Prints tokens/s of both and their ratio (target >= 0.8x), and the peak RSS of this process against the
model's bytes in its working dtype (target <= 1.3x). Also the bf16/fp32 matmul speed ratio that
`--dtype auto` decides by on CPU.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from abliterate.measure.directions import mean_last_token_residuals
from abliterate.core.load import cpu_bf16_speedup, load_model
from abliterate.core.prompts import format_prompts, load_prompts


def bare_forward(model, tokenizer, prompts, batch_size):
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [prompts[i] for i in order[start:start + batch_size]]
            inputs = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            model(**inputs, use_cache=False)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser()
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
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timings = {"bare forward": [], "directions": []}
    for _ in range(2):  # interleaved repeats: both sides see the same machine state
        start = time.perf_counter()
        bare_forward(model, tokenizer, prompts, args.batch_size)
        timings["bare forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        mean_last_token_residuals(model, tokenizer, loaded.adapter, prompts, args.batch_size)
        timings["directions"].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}

    print(f"cpu: {cpu_name()}, {torch.get_num_threads()} threads; model {args.model} in {loaded.dtype} "
          f"(bf16/fp32 matmul speed on this CPU: {cpu_bf16_speedup():.2f}x)")
    print(f"{len(prompts)} prompts, {n_tokens} tokens, batch {args.batch_size}")
    for name, seconds in best.items():
        print(f"  {name:<13} {seconds:7.2f} s  {n_tokens / seconds:9.0f} tokens/s")
    print(f"throughput ratio directions / bare forward: {best['bare forward'] / best['directions']:.2f}x (target >= 0.8x)")
    print(f"peak RSS (load + directions) {peak_rss / 2**30:.2f} GiB vs model {model_bytes / 2**30:.2f} GiB: "
          f"{peak_rss / model_bytes:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
