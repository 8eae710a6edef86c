"""What the OpenAI and Ollama adapters of `abliterate serve` share: the served model as a route sees it (its name,
limits and sampling defaults; a conversation rendered into a prompt; one generation planned and queued), the events a
generation streams back, the error each API turns into its own JSON shape, and the request models both accept."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from abliterate.core.prompts import format_conversation


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers


def error_response(path: str, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The error in the shape of the API the path belongs to: Ollama's under /api/, OpenAI's elsewhere."""
    if path.startswith("/api/"):
        body: dict = {"error": message}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- request bodies both APIs take ---


class Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many fields this server has no use for


class ToolFunction(Loose):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(Loose):
    type: Literal["function"] = "function"
    function: ToolFunction


# --- one generation: what is asked, and what comes back ---


@dataclass
class Plan:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    thoughts: bool  # split <think>...</think> from the answer
    tools: bool  # parse <tool_call>{...}</tool_call> out of the answer


@dataclass
class Job:
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: dict = field(default_factory=dict)
    task: asyncio.Task | None = None

    async def stream(self) -> AsyncIterator[tuple[str, Any]]:
        """("thought" | "answer", text), ("tool_calls", [...]), ("error", message), then ("done", summary)."""
        while True:
            kind, value = await self.events.get()
            if kind == "end":
                return
            yield kind, value


async def collect(job: Job) -> tuple[str, str, list[dict], dict]:
    """A whole generation, for answers that do not stream: (answer, thought, tool calls, done summary)."""
    answer, thought, calls, done = [], [], [], None
    try:
        async for kind, value in job.stream():
            if kind == "answer":
                answer.append(value)
            elif kind == "thought":
                thought.append(value)
            elif kind == "tool_calls":
                calls.extend(value)
            elif kind == "error":
                raise ApiError(500, value, "server_error")
            elif kind == "done":
                done = value
    finally:
        job.cancelled.set()
    if done is None:
        raise ApiError(499, "the request was cancelled", "cancelled")
    return "".join(answer), "".join(thought), calls, done


# --- the served model ---


def template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def template_tool_call(call: dict) -> dict:
    """A tool call as chat templates expect it: {"type", "function": {"name", "arguments": dict}} (OpenAI sends the
    arguments as a JSON string)."""
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "type": call.get("type", "function"), "function": function}


class ServedModel:
    """The model behind every route: requests become prompts here, and prompts one queued generation (`submit`)."""

    def __init__(self, model, tokenizer, name: str, max_tokens_limit: int, submit: Callable[[Request, Plan], Job]):
        self.model, self.tokenizer, self.name, self.max_tokens_limit, self.submit = model, tokenizer, name, max_tokens_limit, submit
        self.started = int(time.time())
        self.context = context_length(model)
        generation_config = getattr(model, "generation_config", None)
        samples = bool(getattr(generation_config, "do_sample", False))
        # unset sampling follows the model's own generation_config; greedy when it does not sample
        self.default_temperature = float(getattr(generation_config, "temperature", None) or 1.0) if samples else 0.0
        self.default_top_p = float(getattr(generation_config, "top_p", None) or 1.0) if samples else 1.0
        self.can_use_tools = "tools" in template_text(tokenizer)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def render(self, messages: list[dict], tools: list[dict] | None) -> str:
        if tools and not self.can_use_tools:
            raise ApiError(400, f"{self.name}'s chat template does not render tools, so this model cannot be given "
                                "`tools`; send the request without them", param="tools")
        try:
            return format_conversation(self.tokenizer, messages, **({"tools": tools} if tools else {}))
        except Exception as error:  # jinja's TemplateError and friends: the template rejects this conversation
            raise ApiError(400, f"the chat template rejected these messages: {error}", param="messages") from None

    def plan(self, prompt: str, max_tokens: int | None, temperature: float | None, top_p: float | None, stops: list[str],
             seed: int | None, thoughts: bool, tools: bool, default_max_tokens: int | None = None) -> Plan:
        """The request checked against the server's limit and the model's context, with defaults filled in."""
        limit = self.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {limit} "
                                "(abliterate serve --max-tokens-limit)", param="max_tokens")
        prompt_tokens = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        room = limit if self.context is None else self.context - prompt_tokens
        if room <= 0:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and {self.name}'s context is {self.context}; "
                                "shorten the conversation", param="messages", code="context_length_exceeded")
        wanted = max_tokens or default_max_tokens or limit
        return Plan(prompt, min(wanted, room), self.default_temperature if temperature is None else temperature,
                    self.default_top_p if top_p is None else top_p, stops, seed, thoughts, tools)

    def generate(self, request: Request, prompt: str, max_tokens: int | None, temperature: float | None,
                 top_p: float | None, stops: list[str], seed: int | None, thoughts: bool, tools: bool,
                 default_max_tokens: int | None = None) -> Job:
        """The one generation call both APIs make: plan it, then queue it (503 when the queue is full)."""
        return self.submit(request, self.plan(prompt, max_tokens, temperature, top_p, stops, seed, thoughts, tools,
                                              default_max_tokens))
