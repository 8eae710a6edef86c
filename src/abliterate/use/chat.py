"""Talking to a model: a conversation with history, streamed replies, thoughts shown apart from the answer.

The core is `stream_reply` (messages in, text chunks out, from any engine's `stream`: transformers, vLLM, MLX) and
`split_thoughts` (chunks in, ("thought" | "answer", text) out). `chat_loop` is the
terminal conversation; it takes its input and output functions so a test (or `abliterate run`'s chat action)
can drive it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


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


def stream_reply(engine, messages: list[dict], max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0) -> Iterator[str]:
    """The model's answer to `messages`, as text chunks while it is generated (temperature 0: greedy)."""
    yield from stream_completion(engine, format_conversation(engine.tokenizer, messages), max_new_tokens, temperature,
                                 top_p)


def stream_completion(engine, prompt: str, max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int | None = None, cancel: threading.Event | None = None,
                      stats: dict | None = None) -> Iterator[str]:
    """The continuation of an already formatted `prompt` (see `abliterate.plugins.Engine.stream`); a template that
    opens the thought itself (the prompt ends in <think>) gets the tag first, so the reply starts inside it."""
    if prompt.rstrip().endswith(THINK_OPEN):
        yield THINK_OPEN
    yield from engine.stream(prompt, max_new_tokens, temperature, top_p, seed=seed, cancel=cancel, stats=stats)


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


def chat_loop(engine, read: Callable[[str], str], write: Callable[[str, str], None],
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
            for kind, text in split_thoughts(stream_reply(engine, conversation.messages(), max_new_tokens, temperature)):
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
