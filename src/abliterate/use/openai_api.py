"""The OpenAI-compatible routes of `abliterate serve`: POST /v1/chat/completions (streamed as server-sent events or
not, `tools` where the chat template renders them), POST /v1/completions (raw text), GET /v1/models. Each route
turns its request into one generation on the served model, and that generation's events into OpenAI's shapes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field

from abliterate.use.api_common import ApiError, Job, Loose, ServedModel, Tool, collect, template_tool_call

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 16


class TextPart(Loose):
    type: str
    text: str | None = None


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class Sampling(Loose):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None


class ChatCompletionRequest(Sampling):
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    logprobs: bool | None = None


class CompletionRequest(Sampling):
    model: str = ""
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


def openai_router(served: ServedModel) -> APIRouter:
    """The /v1 routes, answering for `served`."""
    router = APIRouter()
    card = {"id": served.name, "object": "model", "created": served.started, "owned_by": "abliterate"}

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card]}

    @router.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != served.name:
            raise ApiError(404, f"model {name} not found; this server has {served.name}", "not_found_error",
                           code="model_not_found")
        return card

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_chat(body)
        use_tools = bool(body.tools) and body.tool_choice != "none"
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if use_tools else None
        prompt = served.render(openai_messages(body.messages), tools)
        job = served.generate(request, prompt, body.max_completion_tokens or body.max_tokens, body.temperature,
                              body.top_p, stops(body.stop), body.seed, thoughts=True, tools=use_tools)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": served.name}
        if body.stream:
            return event_stream(chat_events(job, head, wants_usage(body)))
        return chat_completion(head, *await collect(job))

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_n(body)
        if body.suffix or body.echo or body.logprobs or (body.best_of or 1) > 1:
            raise ApiError(400, "suffix, echo, logprobs and best_of are not supported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt per request (a string)", param="prompt")
        job = served.generate(request, prompts[0], body.max_tokens, body.temperature, body.top_p, stops(body.stop),
                              body.seed, thoughts=False, tools=False, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": served.name}
        if body.stream:
            return event_stream(completion_events(job, head, wants_usage(body)))
        answer, _, _, done = await collect(job)
        return {**head, "choices": [{"text": answer, "index": 0, "logprobs": None, "finish_reason": done["finish_reason"]}],
                "usage": usage(done)}

    return router


# --- requests in ---


def check_n(body: Sampling) -> None:
    if body.n != 1:
        raise ApiError(400, "n > 1 is not supported; ask once per answer", param="n")


def check_chat(body: ChatCompletionRequest) -> None:
    check_n(body)
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format other than text (JSON mode, schemas) is not supported",
                       param="response_format")


def stops(stop: str | list[str] | None) -> list[str]:
    given = [stop] if isinstance(stop, str) else list(stop or [])
    if len(given) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings; got {len(given)}", param="stop")
    return [s for s in given if s]


def wants_usage(body: Sampling) -> bool:
    return bool((body.stream_options or {}).get("include_usage"))


def openai_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI's messages as chat templates take them: text content only, `developer` as `system`."""
    converted = []
    for number, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            other = [part.type for part in content if part.type != "text"]
            if other:
                raise ApiError(400, f"messages[{number}]: content of type {other[0]} is not supported; this server "
                                    "takes text only", param=f"messages.{number}.content")
            content = "".join(part.text or "" for part in content)
        item: dict = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
        if message.tool_calls:
            item["tool_calls"] = [template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.name:
            item["name"] = message.name
        converted.append(item)
    return converted


# --- answers out ---


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


def openai_tool_calls(calls: list[dict], streaming: bool) -> list[dict]:
    out = []
    for index, call in enumerate(calls):
        item = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        out.append({"index": index, **item} if streaming else item)
    return out


def chat_completion(head: dict, answer: str, thought: str, calls: list[dict], done: dict) -> dict:
    message: dict = {"role": "assistant", "content": answer if answer or not calls else None}
    if thought:
        message["reasoning_content"] = thought
    if calls:
        message["tool_calls"] = openai_tool_calls(calls, streaming=False)
    return {**head, "object": "chat.completion", "choices": [{"index": 0, "message": message, "logprobs": None,
                                                                "finish_reason": done["finish_reason"]}],
            "usage": usage(done)}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(message: str) -> str:
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_events(job: Job, head: dict, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        return sse({**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in job.stream():
            if kind == "answer":
                yield chunk({"content": value})
            elif kind == "thought":
                yield chunk({"reasoning_content": value})
            elif kind == "tool_calls":
                yield chunk({"tool_calls": openai_tool_calls(value, streaming=True)})
            elif kind == "error":
                yield sse_error(value)
            elif kind == "done":
                yield chunk({}, value["finish_reason"])
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(value)})
        yield sse("[DONE]")
    finally:  # the client hung up, or the answer is complete: either way the generation may stop
        job.cancelled.set()


async def completion_events(job: Job, head: dict, include_usage: bool) -> AsyncIterator[str]:
    try:
        async for kind, value in job.stream():
            if kind == "answer":
                yield sse({**head, "choices": [{"text": value, "index": 0, "logprobs": None, "finish_reason": None}]})
            elif kind == "error":
                yield sse_error(value)
            elif kind == "done":
                yield sse({**head, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                "finish_reason": value["finish_reason"]}]})
                if include_usage:
                    yield sse({**head, "choices": [], "usage": usage(value)})
        yield sse("[DONE]")
    finally:
        job.cancelled.set()
