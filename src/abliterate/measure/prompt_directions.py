"""`abliterate directions`: refusal directions from two prompt sets, optionally from the harmful prompts the model
refuses only (what `run` does by default)."""

from __future__ import annotations

import contextlib
from typing import Callable

from abliterate.core.judges import get_judge
from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts
from abliterate.core.settings import MeasureSettings
from abliterate.measure.directions import Directions, measure_directions
from abliterate.measure.engines.transformers import TransformersEngine
from abliterate.measure.evaluate import refused_subset

# The refusal filter judges answers as far as `run` reads them when counting refusals.
FILTER_NEW_TOKENS = MeasureSettings.model_fields["max_new_tokens"].default


def directions_from_prompts(loaded, harmful: list[str], harmless: list[str], *, system_prompt: str | None,
                            batch_size: int, projected: bool, winsorize: float | None, refused_only: bool,
                            note: Callable[[str], None] = lambda line: None,
                            progress_bar: Callable[[int], tuple] | None = None) -> tuple[Directions, int]:
    """The directions and how many harmful prompts they come from. `progress_bar(total)` gives a context and an
    `advance(n)` callback for the residual pass; `note` hears what the filter decided."""
    offered = len(harmful)
    if refused_only:
        note(f"finding the harmful prompts the model refuses (of {offered})")
        formatted = format_prompts(loaded.tokenizer, harmful, DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt)
        refused = refused_subset(TransformersEngine(loaded.model, loaded.tokenizer), harmful, formatted, get_judge(), FILTER_NEW_TOKENS,
                                 batch_size)
        if refused is None:
            note("the model hardly refuses them: directions from all of them")
        harmful = refused or harmful
    context, advance = progress_bar(len(harmful) + len(harmless)) if progress_bar else (contextlib.nullcontext(), None)
    with context:
        result = measure_directions(loaded, harmful, harmless, system_prompt=system_prompt, batch_size=batch_size,
                                    projected=projected, winsorize_quantile=winsorize, progress=advance,
                                    metadata={"harmful_offered": offered,
                                              "harmful_filter": "refused" if refused_only else "all"})
    return result, len(harmful)
