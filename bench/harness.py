"""The harness every benchmark in bench/ uses: machine, commit, timing, and its figures written as JSON.

A benchmark compares two ways of doing the same work *in one run* (alternating, best of repeats) and reports ratios,
so its figures hold on any machine; absolute seconds are context, never compared across runs.

    result = harness.record("packed", {"generation_speedup": 1.45, ...}, title="prepacked weights",
                            headline="generation 9.07 -> 6.26 s (1.45x)")

prints the headline with the machine and commit and writes bench/results/packed.json (the newest run of that
benchmark: name, title, date, commit, dirty, machine, command, headline, figures; `--json PATH` writes elsewhere).

    python bench/harness.py table [--ledger] [--results DIR]

prints the README's "## Benchmarks" table rows from bench/results/*.json (`--ledger`: rows for docs/benchmarks.md,
the record of every published figure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")  # the ones that decide CPU matmul speed


# ---- where and what a run measured ----

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as file:
            flags = next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [flag for flag in CPU_FLAGS if flag in flags]


def machine() -> dict:
    """CPU, cores this process may use, the flags that matter, torch and its threads, the GPU if any."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    described = {"cpu": cpu_name(), "cores": cores, "flags": cpu_flags(), "python": platform.python_version()}
    try:
        import torch
    except ImportError:  # serve.py's client side needs no torch
        return described
    described.update(torch=torch.__version__, threads=torch.get_num_threads())
    if torch.cuda.is_available():
        described["gpu"] = torch.cuda.get_device_name(0)
    return described


def machine_summary(described: dict) -> str:
    """One line as the ledger writes it: "2-core Intel Xeon Platinum 8480+ (AVX-512, AVX512-BF16, AMX)"."""
    cpu = described["cpu"]
    for noise in ("(R)", "(TM)", " Processor", " CPU"):
        cpu = cpu.replace(noise, "")
    cpu = " ".join(word for word in cpu.split("@")[0].split() if not word.endswith("-Core"))
    flags = set(described.get("flags", []))
    names = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("amx_tile", "AMX"))
             if flag in flags] or (["AVX2 only"] if "avx2" in flags else [])
    text = f"{described['cores']}-core {cpu}" + (f" ({', '.join(names)})" if names else "")
    return f"1 {described['gpu']}, {text}" if described.get("gpu") else text


def commit() -> tuple[str, bool]:
    """The short commit of the checkout and whether tracked files differ from it ("unknown" outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout

    try:
        return git("rev-parse", "--short", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def this_command(argv: list[str] | None = None) -> str:
    """How this run was started, from the repository root: `python bench/NAME.py ARGS`, less `--json PATH`
    (where a result is written is not how it was measured)."""
    script, *args = argv or sys.argv
    script = Path(script).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(script.name)
    kept = []
    for arg in args:
        if kept and kept[-1] == "--json":
            kept.pop()
        elif not arg.startswith("--json="):
            kept.append(arg)
    return shlex.join(["python", str(shown), *kept])


# ---- options every benchmark shares ----

def parser(doc: str, repeats: int | None = None) -> argparse.ArgumentParser:
    """The script's docstring as its help, `--json PATH`, and `--repeats` where the script alternates repeats."""
    made = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument("--json", metavar="PATH", type=Path, default=None,
                      help="write the result here (default: bench/results/NAME.json)")
    if repeats is not None:
        made.add_argument("--repeats", type=int, default=repeats,
                          help=f"alternating repeats; each side's best counts (default {repeats})")
    return made


# ---- timing ----

@dataclass
class Timed:
    """One side of a comparison: the seconds of each call and what each call returned."""

    seconds: list[float] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)


def alternate(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timed]:
    """Each function called `repeats` times, taking turns (A, B, A, B...), so that a busy or warming machine
    slows every side alike; compare the sides' `best`."""
    timings = {name: Timed() for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            value = function()
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].values.append(value)
    return timings


def per_call(function: Callable[[], Any], calls: int = 30, warmup: int = 3) -> float:
    """Mean seconds per call of something too quick to time once (a single matrix product)."""
    for _ in range(warmup):
        function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def ratio(before: float, after: float) -> float:
    """How many times `after` beats `before` (seconds: >1 is faster); nan where `after` is zero."""
    return before / after if after else float("nan")


def peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


# ---- results ----

@dataclass
class Result:
    name: str
    title: str
    headline: str
    figures: dict
    command: str
    date: str
    commit: str
    dirty: bool
    machine: dict


def finite(data: Any) -> Any:
    """`data` with nan and infinity as None: strict JSON has no such numbers (a ratio over a zero time)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def write_json(path: Path, data: dict) -> None:
    """Written to a temporary file beside `path`, then renamed over it: a reader never sees half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as file:
        json.dump(finite(data), file, indent=2, ensure_ascii=False, allow_nan=False)
        file.write("\n")
    os.replace(file.name, path)


def record(name: str, figures: dict, command: str | None = None, *, title: str, headline: str,
           path: Path | None = None) -> Result:
    """Print the headline, machine and commit; write the result as JSON (default bench/results/NAME.json)."""
    sha, dirty = commit()
    result = Result(name=name, title=title, headline=headline, figures=figures, command=command or this_command(),
                    date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=sha, dirty=dirty,
                    machine=machine())
    path = path or RESULTS / f"{name}.json"
    write_json(path, asdict(result))
    print(f"[{name}] {headline}\n  {machine_summary(result.machine)}; commit {sha}{' (dirty)' if dirty else ''}; "
          f"written to {path}")
    return result


def load_results(folder: Path = RESULTS) -> list[Result]:
    """Every result in `folder`, newest first."""
    results = [Result(**json.loads(path.read_text())) for path in sorted(folder.glob("*.json"))]
    return sorted(results, key=lambda result: result.date, reverse=True)


def table_rows(results: list[Result], ledger: bool = False) -> list[str]:
    """README rows (benchmark | command | date | machine | newest figure), or the ledger's (date | commit |
    machine | command | result). A figure from a tree with uncommitted changes says so."""
    rows = []
    for result in results:
        sha = result.commit + (" (dirty)" if result.dirty else "")
        cells = ([result.date[:10], sha, machine_summary(result.machine), f"`{result.command}`", result.headline]
                 if ledger else
                 [result.title, f"`{result.command}`", result.date[:10], machine_summary(result.machine),
                  result.headline + (" (uncommitted code)" if result.dirty else "")])
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def main() -> None:
    commands = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    table = commands.add_subparsers(dest="command", required=True).add_parser(
        "table", help="print table rows from the recorded results")
    table.add_argument("--ledger", action="store_true", help="rows for docs/benchmarks.md instead of the README")
    table.add_argument("--results", type=Path, default=RESULTS, help="folder of results (default bench/results)")
    args = commands.parse_args()
    results = load_results(args.results)
    if not results:
        raise SystemExit(f"no results in {args.results}: run a benchmark first")
    if args.ledger:
        print("| date | commit | machine | command | result |\n|---|---|---|---|---|")
    else:
        print("| benchmark | command | date | machine | newest figure |\n|---|---|---|---|---|")
    print("\n".join(table_rows(results, args.ledger)))


if __name__ == "__main__":
    main()
