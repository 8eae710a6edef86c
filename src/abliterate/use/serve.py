"""`abliterate serve`: one loaded model behind an OpenAI- and Ollama-compatible HTTP API.

This module runs the generations and assembles the app (`create_app`): the API key and body-size guard, errors as
JSON, and the routes of openai_api.py (/v1) and ollama_api.py (/api), which share api_common.py. Errors are JSON in
each API's own shape: `{"error": {"message", "type", ...}}` under /v1, `{"error": "..."}` under /api.

Generation is the engine's `stream` (transformers, vLLM or MLX: `abliterate.plugins.Engine`). Requests are
queued, not batched: an engine's model is not safe to generate with twice at once, so one generation runs at a time
and the others wait their turn in order (a bounded queue: when it is full the answer is 503 with `Retry-After`).
Generation runs in a worker thread, so the server keeps answering while it works; a client that disconnects stops
its generation within a token and frees the slot for the next request.

Sampling: temperature and top_p default to the model's generation_config (greedy when it does not sample);
`max_tokens` (Ollama: `num_predict`) above the server's limit is refused, and is cut to what the model's context
leaves after the prompt; `stop` strings end the answer (not included) and stop the generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections.abc import Iterable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from abliterate.use.api_common import ApiError, Job, Plan, ServedModel, Tool, ToolFunction, error_response
from abliterate.use.chat import split_thoughts, stream_completion
from abliterate.use.ollama_api import OllamaChatRequest, OllamaGenerateRequest, OllamaMessage, OllamaOptions, ollama_router
from abliterate.use.openai_api import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    TextPart,
    openai_router,
)

# the request models and ApiError have their own modules now; importable from here as before
__all__ = ["ApiError", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "COMPLETIONS_DEFAULT_MAX_TOKENS",
           "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_QUEUE", "DEFAULT_MAX_TOKENS_LIMIT", "DEFAULT_PORT", "OllamaChatRequest",
           "OllamaGenerateRequest", "OllamaMessage", "OllamaOptions", "TOOL_CALL_OPEN", "TextPart", "Tool", "ToolFunction",
           "create_app", "parse_tool_calls"]

DEFAULT_PORT = 11435  # next to Ollama's 11434, and clear of llama.cpp (8080), vLLM (8000), LM Studio (1234)
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_MAX_QUEUE = 16
TOOL_CALL_OPEN = "<tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)


# --- the app ---


def create_app(engine, model_name: str, api_key: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_queue: int = DEFAULT_MAX_QUEUE) -> FastAPI:
    """The ASGI app serving the model `engine` runs (an `abliterate.plugins.Engine`) under `model_name`. `api_key`:
    every request but GET / must carry it."""
    queue = _Queue(engine, max_queue)
    served = ServedModel(engine.hf_model, engine.tokenizer, model_name, max_tokens_limit, queue.submit)
    app = FastAPI(title="abliterate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue
    _add_error_handlers(app)
    app.include_router(openai_router(served))
    app.include_router(ollama_router(served))

    @app.get("/", response_class=PlainTextResponse)
    async def alive():
        return f"abliterate is serving {model_name}"

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or FastAPI's, as JSON in the shape of the API that was called."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(request.url.path, error.status, error.message, error.kind, error.param, error.code,
                              error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid").get("ctx", {}).get("error", "")
            return error_response(request.url.path, 400, f"request body is not valid JSON ({detail})".replace(" ()", ""))
        parts = []
        for problem in problems[:3]:
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            parts.append(f"{where or 'body'}: {problem.get('msg')}")
        param = ".".join(str(part) for part in problems[0].get("loc", ()) if part != "body") if problems else None
        return error_response(request.url.path, 400, "invalid request: " + "; ".join(parts), param=param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return error_response(request.url.path, error.status_code, message, "not_found_error" if error.status_code == 404
                              else "invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception):
        return error_response(request.url.path, 500, f"internal error: {type(error).__name__}: {error}", "server_error")

# --- generation: one at a time, in a worker thread ---


class _Queue:
    """The generation call behind ServedModel.submit: a FIFO lock (one generation at a time) and a bounded queue."""

    def __init__(self, engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.lock = asyncio.Lock()  # FIFO: waiters get it in the order they asked
        self.pending = 0  # running + waiting
        self.generations = 0
        self._tasks: set[asyncio.Task] = set()

    def submit(self, request: Request, plan: Plan) -> Job:
        if self.pending > self.max_queue:
            raise ApiError(503, f"the server is busy: one generation running and {self.pending - 1} waiting "
                                f"(queue limit {self.max_queue}); retry shortly", kind="server_busy",
                           headers={"Retry-After": "1"})
        self.pending += 1
        job = Job()
        job.task = asyncio.get_running_loop().create_task(self._run(job, request, plan))
        self._tasks.add(job.task)
        job.task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, request: Request, plan: Plan) -> None:
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

    def _generate(self, job: Job, loop: asyncio.AbstractEventLoop, plan: Plan) -> None:
        """In a worker thread: generate, cut at stop strings, split thoughts, pull tool calls out; events to the loop."""

        def emit(kind, value):
            loop.call_soon_threadsafe(job.events.put_nowait, (kind, value))

        started = time.perf_counter()
        first: list[float] = []
        stopped: list[str] = []
        calls: list[dict] = []
        try:
            chunks = stream_completion(self.engine, plan.prompt, plan.max_new_tokens, plan.temperature, plan.top_p,
                                       seed=plan.seed, cancel=job.cancelled, stats=job.stats)
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


async def _watch_disconnect(job: Job, request: Request) -> None:
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

# --- before the app: API key and body size ---


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
            await error_response(path, status, message, **extra)(scope, receive, send)

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
