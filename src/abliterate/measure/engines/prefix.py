"""Prefix reuse: the layers below a trial's first edited layer compute the same thing in every trial — skip them.

For a fixed prompt batch, the residual stream entering layer j is the base model's whenever no layer below j is
edited, and so is the prompt's KV cache of those layers. `PrefixCache` keeps, per batch (keyed by its texts):

    hidden[j]  the stream entering layer j, for a few "stops" j = k, 2k, ... ≤ top (k, top set by a memory budget)
    kv[i]      (generation) the prompt's cache of layer i < top

A trial whose first edited layer is L starts at the highest stored stop s ≤ L: layers below s are swapped for
stand-ins that return hidden[s] (the layer list keeps its length, so per-layer masks, rotary tables and cache
indices stay right), and after a prefill their kv is put back into the cache. Entries are filled as trials
run, only from layers below the trial's first edited layer, so everything kept is the base model's own.
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
from torch import nn

from abliterate.core.arch import adapter_for


def default_budget(model) -> int:
    """Bytes one prompt set may keep: a quarter of the weights, at least 64 MiB, at most 1 GiB."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return min(1 << 30, max(64 << 20, weights // 4))


def plan_stops(n_layers: int, stop_bytes: float, kv_layer_bytes: float, budget: float) -> list[int]:
    """Stops k, 2k, ..., top that fit the budget and skip the most layers, summed over first edited layers
    0..n-1. Each stop costs `stop_bytes`; a stop at `top` also needs the KV of the `top` layers below it."""
    best, best_saved = [], 0
    for k in range(1, n_layers):
        for top in range(k, n_layers, k):
            if (top // k) * stop_bytes + top * kv_layer_bytes > budget:
                break
            stops = list(range(k, top + 1, k))
            saved = sum(s * (e - s) for s, e in zip(stops, stops[1:] + [n_layers]))
            if saved > best_saved:
                best, best_saved = stops, saved
    return best


def cache_of(output):
    """The KV cache of a model output: `cache` from transformers 5.24, `past_key_values` before."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _nbytes(value) -> int:
    tensors = [value] if isinstance(value, torch.Tensor) else [value.keys, value.values]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Skip(nn.Module):
    """Stands in for a layer below the start: returns the stored stream, computes nothing."""

    def __init__(self, hidden: torch.Tensor, arity: int | None):
        super().__init__()
        self.hidden, self.arity = hidden, arity

    def forward(self, *args, **kwargs):
        return self.hidden if self.arity is None else (self.hidden,) + (None,) * (self.arity - 1)


class PrefixCache:
    """Base-model states of one prompt set's fixed batches, reused by trials. Bound to the first model it sees."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = budget_bytes  # None: default_budget(model)
        self.stops: list[int] | None = None  # planned on first use
        self.hidden: dict = {}  # (texts, layer) → stream entering that layer, [batch, tokens, hidden]
        self.kv: dict = {}  # (texts, layer) → a shallow copy of that layer's prompt cache
        self.used = 0  # bytes kept
        self._model = None
        self._layers = None
        self._reusable = False
        self._arity = None  # a layer returns a tensor (None) or a tuple of this length

    def _bind(self, model) -> bool:
        if self._model is None:
            adapter = adapter_for(model)
            self._model, self._layers = weakref.ref(model), adapter.layers
            self._reusable = adapter.family.prefix_reuse
            self.budget_bytes = default_budget(model) if self.budget_bytes is None else self.budget_bytes
        return self._reusable and self._model() is model

    def _keep(self, store: dict, key, value) -> None:
        size = _nbytes(value)
        if key not in store and self.used + size <= self.budget_bytes:
            store[key] = value
            self.used += size

    def _start(self, texts, first_edited_layer: int, generation: bool) -> int:
        for stop in sorted(self.stops, reverse=True):
            if stop <= first_edited_layer and (texts, stop) in self.hidden and (
                    not generation or all((texts, i) in self.kv for i in range(stop))):
                return stop
        return 0

    def forward(self, model, texts: tuple, first_edited_layer: int | None, total_tokens: int, run,
                generation: bool = False):
        """`run()`: the forward pass (first-token logprobs) or prefill (generation) of batch `texts`, where no layer
        below `first_edited_layer` differs from the base model. Returns its output, computed from the highest
        stored stop; with `generation`, the skipped layers' prompt KV is back in the output's cache."""
        if first_edited_layer is None or not self._bind(model):
            return run()
        if self.stops is None:
            return self._plan(run, total_tokens, generation)
        layers, start = self._layers, self._start(texts, first_edited_layer, generation)
        originals, hooks = [layers[i] for i in range(start)], []
        try:
            for i in range(start):
                layers[i] = _Skip(self.hidden[texts, start], self._arity)
            for stop in self.stops:  # keep the stream entering stops that are still the base's in this trial
                if start < stop <= first_edited_layer and (texts, stop) not in self.hidden:
                    keep = functools.partial(self._keep_input, (texts, stop))
                    hooks.append(layers[stop].register_forward_pre_hook(keep, with_kwargs=True))
            output = run()
        finally:
            for handle in hooks:
                handle.remove()
            for i, layer in enumerate(originals):
                layers[i] = layer
        if generation and self.stops:
            cache = cache_of(output)
            for i in range(start):
                cache.layers[i] = copy.copy(self.kv[texts, i])  # decoding replaces its tensors, never writes them
            for i in range(start, min(first_edited_layer, self.stops[-1])):
                self._keep(self.kv, (texts, i), copy.copy(cache.layers[i]))
        return output

    def _keep_input(self, key, module, args, kwargs):
        self._keep(self.hidden, key, _hidden_arg(args, kwargs).detach().clone())

    def _plan(self, run, total_tokens: int, generation: bool):
        """First use: a plain pass that measures what a stop and a layer's KV cost per token, then the plan."""
        seen = {}

        def before(module, args, kwargs):
            hidden = _hidden_arg(args, kwargs)
            seen["tokens"], seen["bytes"] = hidden.shape[:-1].numel(), hidden.shape[-1] * hidden.element_size()

        def after(module, args, output):
            seen["arity"] = len(output) if isinstance(output, tuple) else None

        first = self._layers[0]
        hooks = [first.register_forward_pre_hook(before, with_kwargs=True), first.register_forward_hook(after)]
        try:
            output = run()
        finally:
            for handle in hooks:
                handle.remove()
        self._arity, kv_bytes = seen["arity"], 0.0
        if generation:
            from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # replace tensors, never write them

            cache_layers = getattr(cache_of(output), "layers", [])
            if len(cache_layers) != len(self._layers) or any(
                    type(c) not in (DynamicLayer, DynamicSlidingWindowLayer) for c in cache_layers):
                self.stops = []  # a cache we cannot copy safely: full prefills
                return output
            kv_bytes = max(_nbytes(c) for c in cache_layers) / seen["tokens"]
        self.stops = plan_stops(len(self._layers), total_tokens * seen["bytes"], total_tokens * kv_bytes,
                                self.budget_bytes)
        return output
