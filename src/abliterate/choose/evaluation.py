"""`abliterate eval`: refusals on held-out harmful prompts and KL against a base, as one dict."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Callable, ContextManager

from abliterate.core.prompts import BUNDLED_SETS, load_prompts
from abliterate.core.settings import MeasureSettings
from abliterate.errors import UserError
from abliterate.measure.engines import engine_name
from abliterate.measure.evaluate import perplexity
from abliterate.measure.workbench import PromptSplits, Workbench

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
    harmful_prompts, harmless_prompts = read_prompt_sets(harmful, harmless, column, split, default_split="eval")
    prompts = PromptSplits(eval=(harmful_prompts[:limit], harmless_prompts[:limit]))
    text = read_utf8(perplexity_file) if perplexity_file else None
    base = base or recorded_base(settings.model)
    bench = _open(settings.model, settings.revision, prompts, settings, status)
    if not settings.batch_size:
        with status("choosing the batch size"):
            bench.choose_batch_size(settings.max_batch_size, split="eval")
    if base and base != settings.model:
        bench.against(_open(base, None, prompts, settings, status))
    if base:
        with status("measuring the base model's benign answers"):
            bench.baseline("eval")
    with status(f"generating {len(prompts.eval[0])} responses"):
        metrics = bench.measure(None, "eval", kl=bool(base))
    default_label = "eval" if harmful in BUNDLED_SETS else "all prompts"
    metrics.extra.update(model=settings.model, base=base, split=split or default_label,
                         max_new_tokens=settings.max_new_tokens, batch_size=bench.batch_size)
    if text is not None:
        metrics.extra["perplexity"] = perplexity(bench.model, bench.tokenizer, text)
    return metrics.to_dict()


def _open(model: str, revision: str | None, prompts: PromptSplits, settings: MeasureSettings,
          status: Status) -> Workbench:
    with status(f"loading {model} (engine: {engine_name(settings.engine, settings.tensor_parallel)})"):
        return Workbench.open(model, prompts, settings.judge, settings.dtype, settings.device_map, revision,
                              settings.trust_remote_code, settings.engine, **settings.loading(),
                              tensor_parallel=settings.tensor_parallel, batch_size=settings.batch_size or 16,
                              max_new_tokens=settings.max_new_tokens, kl_tokens=settings.kl_tokens,
                              system_prompt=settings.system_prompt)
