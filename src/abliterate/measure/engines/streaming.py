"""Streaming on the transformers engine: one answer as text chunks while transformers' own `generate` writes it
(in a worker thread, through a `TextIteratorStreamer` that hands over each token as soon as it completes a character).
Chat and serve read it through `TransformersEngine.stream`."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator

import torch


def stream_completion(model, tokenizer, prompt: str, max_new_tokens: int = 512, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, cancel: threading.Event | None = None,
                      stats: dict | None = None) -> Iterator[str]:
    """The continuation of an already formatted `prompt`, as text chunks, one per token that completes a character.

    Generation ends at EOS, at `max_new_tokens`, when the caller closes the generator, or when `cancel` is set (from
    any thread). `stats`, if given, gets `prompt_tokens` and `completion_tokens` (kept current while generating)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    prompt_length = inputs["input_ids"].shape[1]
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=prompt_length, completion_tokens=0)
    streamer = _token_streamer_class()(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if seed is not None:
        torch.manual_seed(seed)  # the caller runs one generation at a time: nothing else draws meanwhile
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    failure: list[BaseException] = []
    stop = threading.Event()  # set when the reader goes away (Ctrl-C, a client that disconnects): generation ends

    class StopWhenAsked(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stats["completion_tokens"] = input_ids.shape[1] - prompt_length
            asked = stop.is_set() or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), asked, dtype=torch.bool, device=input_ids.device)

    def work():
        try:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=pad,
                               stopping_criteria=StoppingCriteriaList([StopWhenAsked()]), **sampling)
        except BaseException as error:  # surfaced in the caller's thread below
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        yield from streamer
    finally:
        stop.set()
        worker.join()
    if failure:
        raise failure[0]


@functools.cache
def _token_streamer_class():
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        """Text as soon as a token completes a character (transformers' own streamer waits for a space), so a
        server streams token by token; only an incomplete UTF-8 sequence waits for its next token."""

        def put(self, value):
            if value.dim() > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            printable = text[self.print_len:]
            self.print_len = max(self.print_len, len(text))
            if text.endswith("\n"):
                self.token_cache, self.print_len = [], 0
            if printable:
                self.on_finalized_text(printable)

    return TokenStreamer
