"""Benchmark: a bounded load test of a running OpenAI-compatible server (`abliterate serve`, llama.cpp's
llama-server, Ollama's /v1, vLLM...), through httpx.

    abliterate serve tiny --port 11435 &
    python bench/serve.py --url http://127.0.0.1:11435/v1 [--requests 32] [--concurrency 4] [--max-tokens 32]
    python bench/serve.py --vs-llama-cpp model.gguf --requests 200 --concurrency 16   # both servers, same run

Sends N chat completions (bundled harmless eval prompts, greedy, streaming so time to first token is measured), at
most C at once, and prints requests/s, completion tokens/s, latency and time-to-first-token percentiles, and how
many answers were 4xx, 5xx or failed to connect. `abliterate serve` queues (one generation at a time), so its
latency grows with C while its throughput stays that of one stream; a batching server's throughput grows with C.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import harness
from abliterate.core.prompts import load_prompts


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


def load_test(url: str, model: str | None, requests: int, concurrency: int, max_tokens: int, timeout: float,
              headers: dict) -> dict:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=timeout, limits=limits) as client:
        model = model or client.get(url + "/models", headers=headers).raise_for_status().json()["data"][0]["id"]
        prompts = load_prompts("harmless", split="eval")
        prompts = [prompts[i % len(prompts)] for i in range(requests)]
        done, lock = [0], threading.Lock()

        def run(prompt: str) -> dict:
            result = one_request(client, url, model, prompt, max_tokens, headers)
            with lock:
                done[0] += 1
                print(f"\r{done[0]}/{requests}", end="", flush=True)
            return result

        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(run, prompts))
        wall = time.perf_counter() - started
    print()
    ok = [r for r in results if r["status"] == 200]
    statuses = [r["status"] for r in results]
    return {"model": model, "url": url, "wall": wall, "ok": len(ok), "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "latency": [r["seconds"] for r in ok], "first_token": [r["first_token"] for r in ok],
            "4xx": sum(1 for s in statuses if s and 400 <= s < 500), "5xx": sum(1 for s in statuses if s and s >= 500),
            "errors": statuses.count(None)}


def report(label: str, result: dict, requests: int, concurrency: int, max_tokens: int) -> None:
    print(f"{label}: {result['model']} at {result['url']}: {requests} requests, {concurrency} at once, "
          f"max_tokens {max_tokens}")
    print(f"  {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.1f} completion tokens/s over "
          f"{result['wall']:.1f} s")
    for name, values in (("latency", result["latency"]), ("time to first token", result["first_token"])):
        if values:
            print(f"  {name}: p50 {percentile(values, 0.5):.2f} s, p90 {percentile(values, 0.9):.2f} s, "
                  f"p99 {percentile(values, 0.99):.2f} s, mean {statistics.mean(values):.2f} s")
    print(f"  ok {result['ok']}, 4xx {result['4xx']}, 5xx {result['5xx']}, connection errors {result['errors']}")


def figures(result: dict) -> dict:
    """A load test's result for the record: counts and rates, latencies as percentiles."""
    summary = {key: value for key, value in result.items() if key not in ("latency", "first_token")}
    for name in ("latency", "first_token"):
        values = result[name]
        summary[name] = {"p50": percentile(values, 0.5), "p90": percentile(values, 0.9),
                         "p99": percentile(values, 0.99), "mean": statistics.mean(values) if values else float("nan")}
    return summary


def start_server(command: list[str], url: str, seconds: float = 600) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited early: {' '.join(command)}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"server not ready after {seconds:.0f} s: {' '.join(command)}")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:11435/v1", help="Base URL of the OpenAI API (ends in /v1).")
    parser.add_argument("--vs-llama-cpp", metavar="GGUF", default=None,
                        help="Start `abliterate serve GGUF` and llama.cpp's server (llama_cpp.server) on the same file, "
                             "load-test both in this run and print the ratios (needs sse-starlette, starlette-context).")
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
    shape = (args.requests, args.concurrency, args.max_tokens)
    if not args.vs_llama_cpp:
        result = load_test(args.url.rstrip("/"), args.model, *shape, args.timeout, headers)
        report("server", result, *shape)
        harness.record("serve", {"requests": args.requests, "concurrency": args.concurrency,
                                 "max_tokens": args.max_tokens, "server": figures(result)},
                       title="serving (one server)", path=args.json,
                       headline=f"{result['model']}: {result['tokens_per_s']:.1f} completion tokens/s, p50 latency "
                                f"{percentile(result['latency'], 0.5):.2f} s at {args.concurrency} at once")
        return
    servers = {
        "abliterate serve": [sys.executable, "-m", "abliterate.cli", "serve", args.vs_llama_cpp, "--port", "18435"],
        "llama.cpp server": [sys.executable, "-m", "llama_cpp.server", "--model", args.vs_llama_cpp, "--port", "18436",
                             "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 1),
                             "--n_threads_batch", str(os.cpu_count() or 1),
                             # its default drops a running stream whenever another request arrives: queue instead
                             "--interrupt_requests", "False"],
    }
    results = {}
    for (label, command), port in zip(servers.items(), (18435, 18436)):
        url = f"http://127.0.0.1:{port}/v1"
        process = start_server(command, url)
        try:
            results[label] = load_test(url, None, *shape, args.timeout, {})
        finally:
            process.terminate()
            process.wait(30)
        report(label, results[label], *shape)
    ours, theirs = results["abliterate serve"], results["llama.cpp server"]
    throughput = harness.ratio(ours["tokens_per_s"], theirs["tokens_per_s"])
    latency = harness.ratio(percentile(ours["latency"], 0.5), percentile(theirs["latency"], 0.5))
    print(f"abliterate serve / llama.cpp server: throughput {throughput:.2f}x, p50 latency {latency:.2f}x; "
          f"5xx: {ours['5xx']} vs {theirs['5xx']}")
    harness.record("serve_vs_llama_cpp", {
        "gguf": os.path.basename(args.vs_llama_cpp), "requests": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "throughput_ratio": throughput, "p50_latency_ratio": latency,
        **{label: figures(result) for label, result in results.items()},
    }, title="serving", path=args.json,
        headline=f"`abliterate serve` {ours['tokens_per_s']:.1f} tokens/s, llama.cpp's server "
                 f"{theirs['tokens_per_s']:.1f} ({throughput:.2f}x)")


if __name__ == "__main__":
    main()
