"""Engines run a model forward (greedy generation, first-token and teacher-forced log-probs) with an ablation applied.
`transformers` is the reference engine, with its speed paths (shared prompt head, prefix reuse, packed weights,
static decoding); the interface every engine implements is `abliterate.plugins.Engine`, the registry of engines is
`abliterate.plugins.ENGINES`."""

import contextlib
import importlib.util
import platform

import torch

from abliterate.errors import UserError
from abliterate.plugins import ENGINES, plugin


def engine_name(requested: str) -> str:
    """The engine to use. `auto`: vLLM on a CUDA GPU where it is installed (built for throughput); mlx on Apple
    silicon where mlx-lm is installed (Metal; torch there has no fast path of ours); otherwise the transformers
    engine, whose speed paths were measured on CPUs (the CPU default)."""
    if requested != "auto":
        if requested not in ENGINES:
            raise UserError(f"unknown engine '{requested}'; choose auto or one of: {', '.join(ENGINES)}")
        getattr(plugin(ENGINES, requested), "require", lambda: None)()  # a missing package: one line, before loading
        return requested
    if torch.cuda.is_available() and "vllm" in ENGINES and importlib.util.find_spec("vllm") is not None:
        return "vllm"
    if on_apple_silicon() and "mlx" in ENGINES and importlib.util.find_spec("mlx_lm") is not None:
        return "mlx"
    return "transformers"


def on_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


@contextlib.contextmanager
def opened_engine(loaded, requested: str = "auto"):
    """The engine `requested` (see `engine_name`) over a loaded model, for a `with` block; an engine with processes of
    its own (vLLM) stops them at the end."""
    engine = plugin(ENGINES, engine_name(requested)).from_loaded(loaded)
    try:
        yield engine
    finally:
        getattr(engine, "close", lambda: None)()
