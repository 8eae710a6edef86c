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


def engine_name(requested: str, tensor_parallel: int = 1) -> str:
    """The engine to use. `auto`: vLLM on a CUDA GPU where it is installed (built for throughput); mlx on Apple
    silicon where mlx-lm is installed (Metal; torch there has no fast path of ours); otherwise the transformers
    engine, whose speed paths were measured on CPUs (the CPU default). `tensor_parallel` above 1 needs vllm."""
    name = _resolved(requested)
    if tensor_parallel > 1 and name != "vllm":
        raise UserError(f"tensor_parallel {tensor_parallel} splits a model over GPUs through vLLM, and the engine is "
                        f"{name}: add --engine vllm (pip install vllm), or drop --tensor-parallel")
    return name


def _resolved(requested: str) -> str:
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
def opened_engine(loaded, requested: str = "auto", tensor_parallel: int = 1):
    """The engine `requested` (see `engine_name`) over a loaded model, for a `with` block; an engine with processes of
    its own (vLLM) stops them at the end."""
    name = engine_name(requested, tensor_parallel)
    engine = plugin(ENGINES, name).from_loaded(loaded, **({"tensor_parallel": tensor_parallel} if name == "vllm" else {}))
    try:
        yield engine
    finally:
        getattr(engine, "close", lambda: None)()
