"""`abliterate serve`: one loaded model behind an OpenAI- and Ollama-compatible HTTP API.

OpenAI: POST /v1/chat/completions (streaming or not, `tools` where the chat template renders them), POST
/v1/completions (raw text), GET /v1/models. Ollama: POST /api/chat, POST /api/generate, GET /api/tags (and
/api/show, /api/version). Errors are JSON in each API's own shape: `{"error": {"message", "type", ...}}` under /v1,
`{"error": "..."}` under /api.

Requests are queued, not batched: transformers' `generate` on one model is not safe to run twice at once, so one
generation runs at a time and the others wait their turn in order (a bounded queue: when it is full the answer is
503 with `Retry-After`). Generation runs in a worker thread, so the server keeps answering while it works; a
client that disconnects stops its generation within a token and frees the slot for the next request.

Sampling: temperature and top_p default to the model's generation_config (greedy when it does not sample);
`max_tokens` (Ollama: `num_predict`) above the server's limit is refused, and is cut to what the model's context
leaves after the prompt; `stop` strings end the answer (not included) and stop the generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from abliterate.use.chat import split_thoughts, stream_completion
from abliterate.core.prompts import format_conversation

DEFAULT_PORT = 11435  # next to Ollama's 11434, and clear of llama.cpp (8080), vLLM (8000), LM Studio (1234)
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_QUEUE = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
TOOL_CALL_OPEN = "<tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = status, message, kind, param, code, headers


def _error_response(path: str, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict | None = None) -> JSONResponse:
    if path.startswith("/api/"):
        body: dict = {"error": message}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --- request bodies ---


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many fields this server has no use for


class TextPart(_Loose):
    type: str
    text: str | None = None


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None


class ToolFunction(_Loose):
    name: str
    description: str | None = None
    parameters: dict | None = None


class Tool(_Loose):
    type: Literal["function"] = "function"
    function: ToolFunction


class _Sampling(_Loose):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None


class ChatCompletionRequest(_Sampling):
    model: str = ""
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    response_format: dict | None = None
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    model: str = ""
    prompt: str | list[str]
    max_tokens: int | None = Field(None, ge=1)
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class OllamaOptions(_Loose):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    num_predict: int | None = None
    stop: list[str] | None = None
    seed: int | None = None


class OllamaMessage(_Loose):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list | None = None
    tool_calls: list[dict] | None = None
    tool_name: str | None = None


class OllamaChatRequest(_Loose):
    model: str = ""
    messages: list[OllamaMessage] = []
    stream: bool = True  # Ollama streams unless told not to
    options: OllamaOptions | None = None
    tools: list[Tool] | None = None
    format: Any = None


class OllamaGenerateRequest(_Loose):
    model: str = ""
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: OllamaOptions | None = None
    suffix: str | None = None
    images: list | None = None
    format: Any = None


# --- generation: one at a time, in a worker thread ---


@dataclass
class _Plan:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    thoughts: bool  # split <think>...</think> from the answer
    tools: bool  # parse <tool_call>{...}</tool_call> out of the answer


@dataclass
class _Job:
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


class _Engine:
    def __init__(self, model, tokenizer, max_queue: int):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.lock = asyncio.Lock()  # FIFO: waiters get it in the order they asked
        self.pending = 0  # running + waiting
        self.generations = 0
        self._tasks: set[asyncio.Task] = set()

    def submit(self, request: Request, plan: _Plan) -> _Job:
        if self.pending > self.max_queue:
            raise ApiError(503, f"the server is busy: one generation running and {self.pending - 1} waiting "
                                f"(queue limit {self.max_queue}); retry shortly", kind="server_busy",
                           headers={"Retry-After": "1"})
        self.pending += 1
        job = _Job()
        job.task = asyncio.get_running_loop().create_task(self._run(job, request, plan))
        self._tasks.add(job.task)
        job.task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: _Job, request: Request, plan: _Plan) -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(_watch_disconnect(job, request))
        try:
            async with self.lock:
                if job.cancelled.is_set():
                    return
                self.generations += 1
                future = loop.run_in_executor(None, self._generate, job, loop, plan)
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:  # the server is stopping: end the generation before letting go
                    job.cancelled.set()
                    await asyncio.wait([future])
                    raise
        finally:
            watcher.cancel()
            self.pending -= 1
            job.events.put_nowait(("end", None))

    def _generate(self, job: _Job, loop: asyncio.AbstractEventLoop, plan: _Plan) -> None:
        """In a worker thread: generate, cut at stop strings, split thoughts, pull tool calls out; events to the loop."""

        def emit(kind, value):
            loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))

        started = time.perf_counter()
        first: list[float] = []
        stopped: list[str] = []
        calls: list[dict] = []
        try:
            if plan.seed is not None:
                import torch

                torch.manual_seed(plan.seed)  # no other generation runs meanwhile: the lock is held
            chunks = stream_completion(self.model, self.tokenizer, plan.prompt, plan.max_new_tokens, plan.temperature,
                                       plan.top_p, cancel=job.cancelled, stats=job.stats)
            try:
                texts = _timed(_until_stop(chunks, plan.stops, stopped), first)
                events = split_thoughts(texts) if plan.thoughts else (("answer", text) for text in texts)
                if plan.tools:
                    events = _pull_tool_calls(events, calls)
                after_thought = False
                for kind, text in events:
                    if job.cancelled.is_set():
                        return
                    if kind == "thought":
                        after_thought = True
                    elif kind == "answer" and after_thought:  # "<think>...</think>\n\nAnswer": the answer is "Answer"
                        text = text.lstrip()
                        if not text:
                            continue
                        after_thought = False
                    emit(kind, text)
            finally:
                chunks.close()
        except Exception as error:  # reported to the client; the server stays up
            emit("error", f"generation failed: {type(error).__name__}: {error}")
            return
        if calls:
            emit("tool_calls", calls)
        completion = job.stats.get("completion_tokens", 0)
        reason = "tool_calls" if calls else "stop" if stopped else "length" if completion >= plan.max_new_tokens else "stop"
        ended = time.perf_counter()
        first_at = first[0] if first else ended
        emit("done", {"finish_reason": reason, "prompt_tokens": job.stats.get("prompt_tokens", 0),
                      "completion_tokens": completion, "prompt_seconds": first_at - started,
                      "generation_seconds": ended - first_at, "total_seconds": ended - started})


async def _watch_disconnect(job: _Job, request: Request) -> None:
    """The client went away (while queued or generating): cancel, so the generation stops and the slot frees."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(0.05)


def _timed(texts: Iterable[str], first: list[float]) -> Iterator[str]:
    for text in texts:
        if not first:
            first.append(time.perf_counter())
        yield text


def _until_stop(chunks: Iterable[str], stops: list[str], stopped: list[str]) -> Iterator[str]:
    """The text up to the first stop string (excluded); text that may be the start of one waits for the next chunk.
    Finding one ends the iteration, so the caller closes the generation."""
    if not stops:
        yield from chunks
        return
    pending = ""
    for chunk in chunks:
        pending += chunk
        hits = [(pending.find(stop), stop) for stop in stops if stop in pending]
        if hits:
            at, stop = min(hits)
            if at:
                yield pending[:at]
            stopped.append(stop)
            return
        keep = max((n for stop in stops for n in range(min(len(stop) - 1, len(pending)), 0, -1)
                    if pending.endswith(stop[:n])), default=0)
        if len(pending) > keep:
            yield pending[:len(pending) - keep]
            pending = pending[len(pending) - keep:]
    if pending:
        yield pending


def _pull_tool_calls(events: Iterable[tuple[str, str]], calls: list[dict]) -> Iterator[tuple[str, str]]:
    """Answer text streams until `<tool_call>` starts; from there it is held, and at the end the calls are parsed out
    (into `calls`) and any text left over follows as answer text."""
    held, capturing = "", False
    for kind, text in events:
        if kind != "answer":
            yield kind, text
            continue
        held += text
        if capturing:
            continue
        at = held.find(TOOL_CALL_OPEN)
        if at >= 0:
            if at:
                yield "answer", held[:at]
            held, capturing = held[at:], True
            continue
        keep = next((n for n in range(len(TOOL_CALL_OPEN) - 1, 0, -1) if held.endswith(TOOL_CALL_OPEN[:n])), 0)
        if len(held) > keep:
            yield "answer", held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        content, found = parse_tool_calls(held)
        calls.extend(found)
        if content:
            yield "answer", content


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Qwen/Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks → (text without them,
    [{"name", "arguments": dict}]). A block that is not such JSON stays in the text."""
    calls: list[dict] = []

    def take(match: re.Match) -> str:
        try:
            data = json.loads(match.group(1))
        except json.JSONDecodeError:
            return match.group(0)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            return match.group(0)
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return match.group(0)
        if not isinstance(arguments, dict):
            return match.group(0)
        calls.append({"name": data["name"], "arguments": arguments})
        return ""

    rest = _TOOL_CALL.sub(take, text)
    return (rest.strip() if calls else rest), calls


# --- turning requests into prompts ---


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def _openai_messages(messages: list[ChatMessage]) -> list[dict]:
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
            item["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        if message.tool_call_id:
            item["tool_call_id"] = message.tool_call_id
        if message.name:
            item["name"] = message.name
        converted.append(item)
    return converted


def _template_tool_call(call: dict) -> dict:
    """A tool call as chat templates expect it: {"type", "function": {"name", "arguments": dict}} (OpenAI sends the
    arguments as a JSON string)."""
    function = dict(call.get("function") or {})
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "type": call.get("type", "function"), "function": function}


def _ollama_messages(messages: list[OllamaMessage]) -> list[dict]:
    converted = []
    for number, message in enumerate(messages):
        if message.images:
            raise ApiError(400, f"messages[{number}]: images are not supported; this server takes text only")
        item: dict = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [_template_tool_call(call) for call in message.tool_calls]
        if message.tool_name:
            item["name"] = message.tool_name
        converted.append(item)
    return converted


def _context_length(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise ApiError(400, f"at most 16 stop strings; got {len(stops)}", param="stop")
    return [s for s in stops if s]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _ndjson(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"


def _key_matches(header: str | None, api_key: str) -> bool:
    if not header or not header[:7].lower() == "bearer ":
        return False
    return hmac.compare_digest(header[7:].strip().encode(), api_key.encode())


class _Guard:
    """Pure ASGI middleware, before anything is parsed: the API key, then the body size (Content-Length, and the
    bytes really received). The body is read here and handed on (as JSON whatever its Content-Type), so disconnects
    still reach the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}

        async def refuse(status, message, **extra):
            await _error_response(path, status, message, **extra)(scope, receive, send)

        if self.api_key and path != "/" and not _key_matches(headers.get("authorization"), self.api_key):
            return await refuse(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                                     "key the server was started with", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        too_large = f"request body over this server's limit of {self.max_body_bytes} bytes"
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await refuse(400, "bad Content-Length header")
            if int(length) > self.max_body_bytes:
                return await refuse(413, too_large)
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await refuse(413, too_large)
            body.append(chunk)
            more = message.get("more_body", False)
        if scope["method"] == "POST" and "json" not in headers.get("content-type", ""):
            # every body here is JSON; Ollama reads it whatever the Content-Type (curl -d sends form-urlencoded)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")]}
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --- the app ---


def create_app(model, tokenizer, model_name: str, api_key: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The ASGI app serving `model` under `model_name`. `api_key`: every request but GET / must carry it."""
    from abliterate.version import __version__

    engine = _Engine(model, tokenizer, max_queue)
    app = FastAPI(title="abliterate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    started = int(time.time())
    context = _context_length(model)
    generation_config = getattr(model, "generation_config", None)
    samples = bool(getattr(generation_config, "do_sample", False))
    default_temperature = float(getattr(generation_config, "temperature", None) or 1.0) if samples else 0.0
    default_top_p = float(getattr(generation_config, "top_p", None) or 1.0) if samples else 1.0
    can_use_tools = "tools" in _template_text(tokenizer)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error_response(request.url.path, error.status, error.message, error.kind, error.param, error.code,
                               error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return _error_response(request.url.path, 400, f"request body is not valid JSON ({detail})".replace(" ()", ""))
        parts = []
        for problem in problems[:3]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            parts.append(f"{where or 'body'}: {problem.get('msg')}")
        param = ".".join(str(part) for part in problems[0].get("loc", ()) if part != "body") if problems else None
        return _error_response(request.url.path, 400, "invalid request: " + "; ".join(parts), param=param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return _error_response(request.url.path, error.status_code, message, "not_found_error" if error.status_code == 404
                               else "invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception):
        return _error_response(request.url.path, 500, f"internal error: {type(error).__name__}: {error}", "server_error")

    def render(messages: list[dict], tools: list[dict] | None) -> str:
        if tools and not can_use_tools:
            raise ApiError(400, f"{model_name}'s chat template does not render tools, so this model cannot be given "
                                "`tools`; send the request without them", param="tools")
        try:
            return format_conversation(tokenizer, messages, **({"tools": tools} if tools else {}))
        except Exception as error:  # jinja's TemplateError and friends: the template rejects this conversation
            raise ApiError(400, f"the chat template rejected these messages: {error}", param="messages") from None

    def plan(prompt: str, max_tokens: int | None, temperature: float | None, top_p: float | None, stops: list[str],
             seed: int | None, thoughts: bool, tools: bool, default_max_tokens: int | None = None) -> _Plan:
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {max_tokens_limit} "
                                "(abliterate serve --max-tokens-limit)", param="max_tokens")
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        room = max_tokens_limit if context is None else context - prompt_tokens
        if room <= 0:
            raise ApiError(400, f"the prompt is {prompt_tokens} tokens and {model_name}'s context is {context}; "
                                "shorten the conversation", param="messages", code="context_length_exceeded")
        wanted = max_tokens or default_max_tokens or max_tokens_limit
        return _Plan(prompt, min(wanted, room), default_temperature if temperature is None else temperature,
                     default_top_p if top_p is None else top_p, stops, seed, thoughts, tools)

    # --- OpenAI ---

    def openai_usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    def openai_tool_calls(calls: list[dict], streaming: bool) -> list[dict]:
        out = []
        for index, call in enumerate(calls):
            item = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            out.append({"index": index, **item} if streaming else item)
        return out

    def check_common(body: _Sampling) -> None:
        if body.n != 1:
            raise ApiError(400, "n > 1 is not supported; ask once per answer", param="n")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started, "owned_by": "abliterate"}]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_name:
            raise ApiError(404, f"model {name} not found; this server has {model_name}", "not_found_error",
                           code="model_not_found")
        return {"id": model_name, "object": "model", "created": started, "owned_by": "abliterate"}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_common(body)
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "response_format other than text (JSON mode, schemas) is not supported",
                           param="response_format")
        use_tools = bool(body.tools) and body.tool_choice != "none"
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if use_tools else None
        prompt = render(_openai_messages(body.messages), tools)
        job = engine.submit(request, plan(prompt, body.max_completion_tokens or body.max_tokens, body.temperature,
                                          body.top_p, _stops(body.stop), body.seed, thoughts=True, tools=use_tools))
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "created": created, "model": model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            def chunk(delta: dict, finish: str | None = None) -> str:
                return _sse({**head, "object": "chat.completion.chunk",
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

            async def events():
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
                            yield _sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                        elif kind == "done":
                            yield chunk({}, value["finish_reason"])
                            if include_usage:
                                yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                            "usage": openai_usage(value)})
                    yield _sse("[DONE]")
                finally:
                    job.cancelled.set()

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answer, thought, calls, done = await _collect(job)
        message: dict = {"role": "assistant", "content": answer if answer or not calls else None}
        if thought:
            message["reasoning_content"] = thought
        if calls:
            message["tool_calls"] = openai_tool_calls(calls, streaming=False)
        return {**head, "object": "chat.completion", "choices": [{"index": 0, "message": message, "logprobs": None,
                                                                    "finish_reason": done["finish_reason"]}],
                "usage": openai_usage(done)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_common(body)
        if body.suffix or body.echo or body.logprobs or (body.best_of or 1) > 1:
            raise ApiError(400, "suffix, echo, logprobs and best_of are not supported")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt per request (a string)", param="prompt")
        job = engine.submit(request, plan(prompts[0], body.max_tokens, body.temperature, body.top_p, _stops(body.stop),
                                          body.seed, thoughts=False, tools=False,
                                          default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                try:
                    async for kind, value in job.stream():
                        if kind == "answer":
                            yield _sse({**head, "choices": [{"text": value, "index": 0, "logprobs": None, "finish_reason": None}]})
                        elif kind == "error":
                            yield _sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                        elif kind == "done":
                            yield _sse({**head, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                             "finish_reason": value["finish_reason"]}]})
                            if include_usage:
                                yield _sse({**head, "choices": [], "usage": openai_usage(value)})
                    yield _sse("[DONE]")
                finally:
                    job.cancelled.set()

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        answer, _, _, done = await _collect(job)
        return {**head, "choices": [{"text": answer, "index": 0, "logprobs": None, "finish_reason": done["finish_reason"]}],
                "usage": openai_usage(done)}

    # --- Ollama ---

    def ollama_sampling(options: OllamaOptions | None) -> dict:
        options = options or OllamaOptions()
        predict = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
        return {"max_tokens": predict, "temperature": options.temperature, "top_p": options.top_p,
                "stops": [s for s in options.stop or [] if s], "seed": options.seed}

    def ollama_check(body) -> None:
        if body.format not in (None, ""):
            raise ApiError(400, "format (JSON mode, schemas) is not supported")

    def ollama_done(done: dict) -> dict:
        def nanoseconds(seconds: float) -> int:
            return int(seconds * 1e9)

        return {"done": True, "done_reason": "length" if done["finish_reason"] == "length" else "stop",
                "total_duration": nanoseconds(done["total_seconds"]), "load_duration": 0,
                "prompt_eval_count": done["prompt_tokens"], "prompt_eval_duration": nanoseconds(done["prompt_seconds"]),
                "eval_count": done["completion_tokens"], "eval_duration": nanoseconds(done["generation_seconds"])}

    def ollama_calls(calls: list[dict]) -> list[dict]:
        return [{"function": {"index": index, "name": call["name"], "arguments": call["arguments"]}}
                for index, call in enumerate(calls)]

    async def ollama_response(job: _Job, stream: bool, shape):
        """shape(answer, thought, calls) → the part of each line that carries text (message or response)."""
        if stream:
            async def events():
                try:
                    async for kind, value in job.stream():
                        line = {"model": model_name, "created_at": _now_iso()}
                        if kind in ("answer", "thought"):
                            yield _ndjson({**line, **shape(value if kind == "answer" else "", value if kind == "thought"
                                                           else None, None), "done": False})
                        elif kind == "tool_calls":
                            yield _ndjson({**line, **shape("", None, value), "done": False})
                        elif kind == "error":
                            yield _ndjson({"error": value})
                        elif kind == "done":
                            yield _ndjson({**line, **shape("", None, None), **ollama_done(value)})
                finally:
                    job.cancelled.set()

            return StreamingResponse(events(), media_type="application/x-ndjson")

        answer, thought, calls, done = await _collect(job)
        return {"model": model_name, "created_at": _now_iso(), **shape(answer, thought or None, calls or None),
                **ollama_done(done)}

    def chat_shape(answer: str, thought: str | None, calls: list[dict] | None) -> dict:
        message: dict = {"role": "assistant", "content": answer}
        if thought:
            message["thinking"] = thought
        if calls:
            message["tool_calls"] = ollama_calls(calls)
        return {"message": message}

    def generate_shape(answer: str, thought: str | None, calls) -> dict:
        return {"response": answer, **({"thinking": thought} if thought else {})}

    @app.post("/api/chat")
    async def ollama_chat(body: OllamaChatRequest, request: Request):
        ollama_check(body)
        if not body.messages:  # Ollama's way to load a model: answer at once
            return {"model": model_name, "created_at": _now_iso(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
        prompt = render(_ollama_messages(body.messages), tools)
        sampling = ollama_sampling(body.options)
        job = engine.submit(request, plan(prompt, sampling["max_tokens"], sampling["temperature"], sampling["top_p"],
                                          sampling["stops"], sampling["seed"], thoughts=True, tools=bool(tools)))
        return await ollama_response(job, body.stream, chat_shape)

    @app.post("/api/generate")
    async def ollama_generate(body: OllamaGenerateRequest, request: Request):
        ollama_check(body)
        if body.images or body.suffix:
            raise ApiError(400, "images and suffix are not supported")
        if not body.prompt:  # Ollama's way to load a model
            return {"model": model_name, "created_at": _now_iso(), "response": "", "done": True, "done_reason": "load"}
        if body.raw:
            prompt = body.prompt
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}]
            prompt = render(messages, None)
        sampling = ollama_sampling(body.options)
        job = engine.submit(request, plan(prompt, sampling["max_tokens"], sampling["temperature"], sampling["top_p"],
                                          sampling["stops"], sampling["seed"], thoughts=not body.raw, tools=False))
        return await ollama_response(job, body.stream, generate_shape)

    def tags_entry() -> dict:
        parameters = sum(p.numel() for p in model.parameters())
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        family = getattr(model.config, "model_type", "unknown")
        return {
            "name": model_name, "model": model_name, "modified_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "size": size, "digest": hashlib.sha256(f"{model_name}:{size}:{started}".encode()).hexdigest(),
            "details": {"parent_model": "", "format": "transformers", "family": family, "families": [family],
                        "parameter_size": _parameter_size(parameters), "quantization_level": dtype.upper()},
        }

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [tags_entry()]}

    @app.post("/api/show")
    async def ollama_show():
        return {"template": _template_text(tokenizer), "details": tags_entry()["details"], "parameters": "",
                "model_info": {"general.architecture": getattr(model.config, "model_type", "unknown"),
                               "general.parameter_count": sum(p.numel() for p in model.parameters()),
                               "context_length": context},
                "capabilities": ["completion"] + (["tools"] if can_use_tools else [])}

    @app.get("/api/version")
    async def ollama_version():
        return {"version": __version__}

    @app.get("/", response_class=PlainTextResponse)
    async def alive():
        return f"abliterate is serving {model_name}"

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


async def _collect(job: _Job) -> tuple[str, str, list[dict], dict]:
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


def _parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)
