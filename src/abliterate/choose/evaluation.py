"""`abliterate eval`: refusals on held-out harmful prompts and KL against a base, as one dict."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, ContextManager

from abliterate.core.judges import get_judge
from abliterate.core.load import load_model
from abliterate.core.prompts import BUNDLED_SETS, format_prompts, load_prompts
from abliterate.core.settings import MeasureSettings
from abliterate.errors import UserError
from abliterate.measure.engines.transformers import choose_batch_size
from abliterate.measure.evaluate import Baseline, check_same_vocabulary, evaluate, perplexity

Status = Callable[[str], ContextManager]


def read_prompt_sets(harmful: str, harmless: str, column: str | None, split: str | None,
                     default_split: str = "train") -> tuple[list[str], list[str]]:
    """Both prompt sets; a bundled set without a split gives `default_split`, a file or dataset all of it."""
    def one(source):
        chosen = split if split is not None else (default_split if source in BUNDLED_SETS else None)
        return load_prompts(source, column=column, split=chosen)

    return one(harmful), one(harmless)


def read_utf8(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None


def recorded_base(model: str) -> str | None:
    """The base model a saved model records in its abliteration.json, if any."""
    record = Path(model) / "abliteration.json"
    if record.is_file():
        return json.loads(record.read_text()).get("base_model")
    return None


def evaluate_model(settings: MeasureSettings, *, base: str | None = None, harmful: str = "harmful",
                   harmless: str = "harmless", column: str | None = None, split: str | None = None,
                   limit: int | None = None, perplexity_file: str | None = None,
                   status: Status = lambda message: contextlib.nullcontext()) -> dict:
    """Refusals of `settings.model` on the harmful prompts (the eval split of the bundled sets by default), KL against
    `base` (default: the base the model records) on the harmless ones, and optionally perplexity on a text file."""
    if settings.max_new_tokens <= 0 or settings.kl_tokens < 0 or settings.batch_size < 0 or (limit is not None and limit <= 0):
        raise UserError("--max-new-tokens and --limit must be positive, --kl-tokens and --batch-size not negative")
    judge = get_judge(settings.judge)
    harmful_prompts, harmless_prompts = read_prompt_sets(harmful, harmless, column, split, default_split="eval")
    if limit:
        harmful_prompts, harmless_prompts = harmful_prompts[:limit], harmless_prompts[:limit]
    text = read_utf8(perplexity_file) if perplexity_file else None
    base = base or recorded_base(settings.model)
    loaded = _load(settings.model, settings.revision, settings, status)
    formatted_harmful = format_prompts(loaded.tokenizer, harmful_prompts, settings.system_prompt)
    batch_size = settings.batch_size
    if not batch_size:
        with status("choosing the batch size"):
            batch_size = choose_batch_size(loaded.model, loaded.tokenizer, formatted_harmful,
                                           new_tokens=settings.max_new_tokens)
    baseline = _baseline(loaded, base, harmless_prompts, batch_size, settings, status) if base else None
    with status(f"generating {len(harmful_prompts)} responses"):
        metrics = evaluate(loaded.model, loaded.tokenizer, formatted_harmful, judge, baseline, settings.max_new_tokens,
                           batch_size)
    default_label = "eval" if harmful in BUNDLED_SETS else "all prompts"
    metrics.extra.update(model=settings.model, base=base, split=split or default_label,
                         max_new_tokens=settings.max_new_tokens, batch_size=batch_size)
    if text is not None:
        metrics.extra["perplexity"] = perplexity(loaded.model, loaded.tokenizer, text)
    return metrics.to_dict()


def _load(model: str, revision: str | None, settings: MeasureSettings, status: Status):
    with status(f"loading {model}"):
        return load_model(model, dtype=settings.dtype, device_map=settings.device_map, revision=revision,
                          trust_remote_code=settings.trust_remote_code)


def _baseline(loaded, base: str, harmless_prompts: list[str], batch_size: int, settings: MeasureSettings,
              status: Status) -> Baseline:
    """The base model's benign answers, which KL is measured against (the model itself when it is its own base)."""
    base_loaded = loaded if base == settings.model else _load(base, None, settings, status)
    check_same_vocabulary(loaded.tokenizer, base_loaded.tokenizer)
    with status("measuring the base model's benign answers"):
        return Baseline.measure(base_loaded.model, base_loaded.tokenizer,
                                format_prompts(base_loaded.tokenizer, harmless_prompts, settings.system_prompt),
                                settings.kl_tokens, batch_size=batch_size)
