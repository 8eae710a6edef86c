"""Talking to a model: a conversation with history, streamed replies, thoughts shown apart from the answer.

The core is `stream_reply` (messages in, text chunks out, through transformers' own `generate` and
`TextIteratorStreamer`) and `split_thoughts` (chunks in, ("thought" | "answer", text) out). `chat_loop` is the
terminal conversation; it takes its input and output functions so a test (or `abliterate run`'s chat action)
can drive it.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from abliterate.core.judges import THINK_CLOSE, THINK_OPEN
from abliterate.core.prompts import format_conversation

COMMANDS_HELP = "/reset clears the history, /system TEXT sets the system prompt, /save FILE writes the conversation, exit"


@dataclass
class Conversation:
    system_prompt: str | None = None
    turns: list[dict] = field(default_factory=list)  # user / assistant messages, in order

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + self.turns

    def save(self, path: str | Path) -> Path:
        """JSON with the messages (OpenAI format), written to a temporary file and renamed."""
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps({"messages": self.messages()}, indent=2, ensure_ascii=False) + "\n")
        partial.replace(path)
        return path


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0) -> Iterator[str]:
    """The model's answer to `messages`, as text chunks while it is generated (temperature 0: greedy)."""
    yield from stream_completion(model, tokenizer, format_conversation(tokenizer, messages), max_new_tokens, temperature,
                                 top_p)


def stream_completion(model, tokenizer, prompt: str, max_new_tokens: int = 512, temperature: float = 0.0,
                      top_p: float = 1.0, cancel: threading.Event | None = None, stats: dict | None = None) -> Iterator[str]:
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
        if prompt.rstrip().endswith(THINK_OPEN):
            yield THINK_OPEN  # the template opened the thought; the reply starts inside it
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


def split_thoughts(chunks: Iterable[str]) -> Iterator[tuple[str, str]]:
    """("thought", text) for what is inside <think>...</think>, ("answer", text) for the rest. Tags may be cut
    across chunks: text that could be the start of a tag waits for the next chunk."""
    inside, pending = False, ""
    for chunk in chunks:
        pending += chunk
        while pending:
            tag = THINK_CLOSE if inside else THINK_OPEN
            at = pending.find(tag)
            if at >= 0:
                if at:
                    yield ("thought" if inside else "answer"), pending[:at]
                pending, inside = pending[at + len(tag):], not inside
                continue
            keep = next((n for n in range(len(tag) - 1, 0, -1) if pending.endswith(tag[:n])), 0)
            if len(pending) > keep:
                yield ("thought" if inside else "answer"), pending[:len(pending) - keep]
            pending = pending[len(pending) - keep:]
            break
    if pending:
        yield ("thought" if inside else "answer"), pending


def chat_loop(model, tokenizer, read: Callable[[str], str], write: Callable[[str, str], None],
              conversation: Conversation | None = None, max_new_tokens: int = 512, temperature: float = 0.0) -> Conversation:
    """The terminal conversation. `read(prompt)` returns a line (EOFError ends); `write(kind, text)` shows text of a
    kind: "answer", "thought" or "info". History is kept; only the answer (not the thought) goes back into it."""
    conversation = conversation or Conversation()
    write("info", f"{COMMANDS_HELP}\n")
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            write("info", "\n")
            return conversation
        if not line:
            continue
        if line in ("exit", "quit", "/exit", "/quit", "/bye"):
            return conversation
        if line == "/reset":
            conversation.turns.clear()
            write("info", "history cleared\n")
            continue
        if line == "/system" or line.startswith("/system "):
            conversation.system_prompt = line.removeprefix("/system").strip() or None
            write("info", f"system prompt {'set' if conversation.system_prompt else 'removed'}\n")
            continue
        if line == "/save" or line.startswith("/save "):
            target = line.removeprefix("/save").strip()
            if not target:
                write("info", "usage: /save FILE.json\n")
                continue
            try:
                write("info", f"saved {conversation.save(target)}\n")
            except OSError as error:
                write("info", f"cannot save to {target}: {error.strerror}\n")
            continue
        if line.startswith("/"):
            write("info", f"unknown command {line.split()[0]}; {COMMANDS_HELP}\n")
            continue
        conversation.turns.append({"role": "user", "content": line})
        answer = []
        try:
            for kind, text in split_thoughts(stream_reply(model, tokenizer, conversation.messages(), max_new_tokens,
                                                          temperature)):
                write(kind, text)
                if kind == "answer":
                    answer.append(text)
        except KeyboardInterrupt:
            write("info", " [interrupted]")
        write("info", "\n")
        conversation.turns.append({"role": "assistant", "content": "".join(answer).strip()})


def read_terminal_line(prompt: str) -> str:
    import click

    return input(click.style(prompt, bold=True))


def write_terminal(kind: str, text: str) -> None:
    """Thoughts dim and italic, tool messages in colour, the answer plain; flushed as it streams."""
    import sys

    import click

    styles = {"thought": {"dim": True, "italic": True}, "info": {"fg": "cyan"}}
    click.echo(click.style(text, **styles[kind]) if kind in styles else text, nl=False)
    sys.stdout.flush()
