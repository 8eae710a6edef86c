"""The Ollama-compatible routes of `abliterate serve`: POST /api/chat and POST /api/generate (streamed as
newline-delimited JSON unless `"stream": false`), GET /api/tags, POST /api/show, GET /api/version. Each generating
route turns its request and `options` into one generation on the served model, and its events into Ollama's lines."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from abliterate.use.api_common import ApiError, Job, Loose, ServedModel, Tool, collect, template_text, template_tool_call

# shape(answer, thought, tool calls) → the part of an Ollama line that carries text ("message" or "response")
Shape = Callable[[str, str | None, list[dict] | None], dict]


class OllamaOptions(Loose):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    num_predict: int | None = None
    stop: list[str] | None = None
    seed: int | None = None


class OllamaMessage(Loose):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list | None = None
    tool_calls: list[dict] | None = None
    tool_name: str | None = None


class OllamaChatRequest(Loose):
    model: str = ""
    messages: list[OllamaMessage] = []
    stream: bool = True  # Ollama streams unless told not to
    options: OllamaOptions | None = None
    tools: list[Tool] | None = None
    format: Any = None


class OllamaGenerateRequest(Loose):
    model: str = ""
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None
    suffix: str | None = None
    images: list | None = None
    format: Any = None


def ollama_router(served: ServedModel) -> APIRouter:
    """The /api routes, answering for `served`."""
    from abliterate.version import __version__

    router = APIRouter()

    @router.post("/api/chat")
    async def ollama_chat(body: OllamaChatRequest, request: Request):
        check_format(body)
        if not body.messages:  # Ollama's way to load a model: answer at once
            return {"model": served.name, "created_at": now_iso(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        prompt = served.render(ollama_messages(body.messages), tools)
        job = served.generate(request, prompt, thoughts=True, tools=bool(tools), **sampling(body.options))
        return await respond(served.name, job, body.stream, chat_shape)

    @router.post("/api/generate")
    async def ollama_generate(body: OllamaGenerateRequest, request: Request):
        check_format(body)
        if body.images or body.suffix:
            raise ApiError(400, "images and suffix are not supported")
        if not body.prompt:  # Ollama's way to load a model
            return {"model": served.name, "created_at": now_iso(), "response": "", "done": True, "done_reason": "load"}
        if body.raw:
            prompt = body.prompt
        else:  # like Ollama, the prompt goes through the chat template unless it is raw
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}]
            prompt = served.render(messages, None)
        job = served.generate(request, prompt, thoughts=not body.raw, tools=False, **sampling(body.options))
        return await respond(served.name, job, body.stream, generate_shape)

    @router.get("/api/tags")
    async def ollama_tags():
        return {"models": [tags_entry(served)]}

    @router.post("/api/show")
    async def ollama_show():
        return {"template": template_text(served.tokenizer), "details": tags_entry(served)["details"], "parameters": "",
                "model_info": {"general.architecture": getattr(served.model.config, "model_type", "unknown"),
                               "general.parameter_count": served.parameter_count(), "context_length": served.context},
                "capabilities": ["completion"] + (["tools"] if served.can_use_tools else [])}

    @router.get("/api/version")
    async def ollama_version():
        return {"version": __version__}

    return router


# --- requests in ---


def check_format(body: OllamaChatRequest | OllamaGenerateRequest) -> None:
    if body.format not in (None, ""):
        raise ApiError(400, "format (JSON mode, schemas) is not supported")


def sampling(options: OllamaOptions | None) -> dict:
    """Ollama's options as ServedModel.generate's sampling arguments (num_predict ≤ 0 means no limit of its own)."""
    options = options or OllamaOptions()
    predict = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    return {"max_tokens": predict, "temperature": options.temperature, "top_p": options.top_p,
            "stops": [s for s in options.stop or [] if s], "seed": options.seed}


def ollama_messages(messages: list[OllamaMessage]) -> list[dict]:
    converted = []
    for number, message in enumerate(messages):
        if message.images:
            raise ApiError(400, f"messages[{number}]: images are not supported; this server takes text only")
        item: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [template_tool_call(call) for call in message.tool_calls]
        if message.tool_name:
            item["name"] = message.tool_name
        converted.append(item)
    return converted


# --- answers out ---


def chat_shape(answer: str, thought: str | None, calls: list[dict] | None) -> dict:
    message: dict = {"role": "assistant", "content": answer}
    if thought:
        message["thinking"] = thought
    if calls:
        message["tool_calls"] = [{"function": {"index": index, "name": call["name"], "arguments": call["arguments"]}}
                                 for index, call in enumerate(calls)]
    return {"message": message}


def generate_shape(answer: str, thought: str | None, calls: list[dict] | None) -> dict:
    return {"response": answer, **({"thinking": thought} if thought else {})}


def done_fields(done: dict) -> dict:
    def nanoseconds(seconds: float) -> int:
        return int(seconds * 1e9)

    return {"done": True, "done_reason": "length" if done["finish_reason"] == "length" else "stop",
            "total_duration": nanoseconds(done["total_seconds"]), "load_duration": 0,
            "prompt_eval_count": done["prompt_tokens"], "prompt_eval_duration": nanoseconds(done["prompt_seconds"]),
            "eval_count": done["completion_tokens"], "eval_duration": nanoseconds(done["generation_seconds"])}


async def respond(model_name: str, job: Job, stream: bool, shape: Shape):
    if stream:
        return StreamingResponse(lines(model_name, job, shape), media_type="application/x-ndjson")
    answer, thought, calls, done = await collect(job)
    return {"model": model_name, "created_at": now_iso(), **shape(answer, thought or None, calls or None),
            **done_fields(done)}


async def lines(model_name: str, job: Job, shape: Shape) -> AsyncIterator[str]:
    try:
        async for kind, value in job.stream():
            line = {"model": model_name, "created_at": now_iso()}
            if kind in ("answer", "thought"):
                text = shape(value if kind == "answer" else "", value if kind == "thought" else None, None)
                yield ndjson({**line, **text, "done": False})
            elif kind == "tool_calls":
                yield ndjson({**line, **shape("", None, value), "done": False})
            elif kind == "error":
                yield ndjson({"error": value})
            elif kind == "done":
                yield ndjson({**line, **shape("", None, None), **done_fields(value)})
    finally:  # the client hung up, or the answer is complete: either way the generation may stop
        job.cancelled.set()


def ndjson(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# --- the model list ---


def tags_entry(served: ServedModel) -> dict:
    parameters = served.parameter_count()
    size = sum(p.numel() * p.element_size() for p in served.model.parameters())
    dtype = str(next(served.model.parameters()).dtype).removeprefix("torch.")
    family = getattr(served.model.config, "model_type", "unknown")
    name, started = served.name, served.started
    return {
        "name": name, "model": name, "modified_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "size": size, "digest": hashlib.sha256(f"{name}:{size}:{started}".encode()).hexdigest(),
        "details": {"parent_model": "", "format": "transformers", "family": family, "families": [family],
                    "parameter_size": parameter_size(parameters), "quantization_level": dtype.upper()},
    }


def parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)
