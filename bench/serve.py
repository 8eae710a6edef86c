"""Benchmark: a bounded load test of a running OpenAI-compatible server (`abliterate serve`, llama.cpp's
llama-server, Ollama's /v1, vLLM...), through httpx.

    abliterate serve tiny --port 11435 &
    python bench/serve.py --url http://127.0.0.1:11435/v1 [--requests 32] [--concurrency 4] [--max-tokens 32]

Sends N chat completions (bundled harmless eval prompts, greedy, streaming so time to first token is measured), at
most C at once, and prints requests/s, completion tokens/s, latency and time-to-first-token percentiles, and how
many answers were 4xx, 5xx or failed to connect. `abliterate serve` queues (one generation at a time), so its
latency grows with C while its throughput stays that of one stream; a batching server's throughput grows with C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from abliterate.prompts import load_prompts


def one_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int, headers: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first, tokens, chunks = None, None, 0
    try:
        with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                return {"status": response.status_code, "seconds": time.perf_counter() - started}
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0]["delta"].get("content"):
                    chunks += 1
                    first = first or time.perf_counter()
    except httpx.HTTPError as error:
        return {"status": None, "error": type(error).__name__, "seconds": time.perf_counter() - started}
    ended = time.perf_counter()
    return {"status": 200, "seconds": ended - started, "first_token": (first or ended) - started,
            "tokens": tokens if tokens is not None else chunks}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:11435/v1", help="Base URL of the OpenAI API (ends in /v1).")
    parser.add_argument("--model", default=None, help="Model name (default: the first of GET /models).")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    args = parser.parse_args()
    if args.requests <= 0 or args.concurrency <= 0 or args.max_tokens <= 0:
        parser.error("--requests, --concurrency and --max-tokens must be positive")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(timeout=args.timeout, limits=limits) as client:
        model = args.model or client.get(url + "/models", headers=headers).raise_for_status().json()["data"][0]["id"]
        prompts = load_prompts("harmless", split="eval")
        prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
        done, lock = [0], threading.Lock()

        def run(prompt: str) -> dict:
            result = one_request(client, url, model, prompt, args.max_tokens, headers)
            with lock:
                done[0] += 1
                print(f"\r{done[0]}/{args.requests}", end="", flush=True)
            return result

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(run, prompts))
        wall = time.perf_counter() - started
    print()
    ok = [r for r in results if r["status"] == 200]
    latencies = [r["seconds"] for r in ok]
    first_tokens = [r["first_token"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    print(f"{model} at {url}: {args.requests} requests, {args.concurrency} at once, max_tokens {args.max_tokens}")
    print(f"  {len(ok) / wall:.2f} requests/s, {tokens / wall:.1f} completion tokens/s over {wall:.1f} s")
    for label, values in (("latency", latencies), ("time to first token", first_tokens)):
        if values:
            print(f"  {label}: p50 {percentile(values, 0.5):.2f} s, p90 {percentile(values, 0.9):.2f} s, "
                  f"p99 {percentile(values, 0.99):.2f} s, mean {statistics.mean(values):.2f} s")
    statuses = [r["status"] for r in results]
    print(f"  ok {len(ok)}, 4xx {sum(1 for s in statuses if s and 400 <= s < 500)}, "
          f"5xx {sum(1 for s in statuses if s and s >= 500)}, connection errors {statuses.count(None)}")


if __name__ == "__main__":
    main()
