"""`abliterate serve` end to end: a live uvicorn server on loopback serving a tiny random llama, driven by the real
`openai` and `ollama` clients (and raw httpx for what clients would not send). Answers equal greedy generation,
streams join to the same text, bad requests get 4xx JSON errors, requests queue one generation at a time, and a
client that disconnects mid-stream stops its generation and frees the slot."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from conftest import build_tiny_model, build_tiny_tokenizer

from abliterate.use import serve as serve_module
from abliterate.measure.engines.transformers import TransformersEngine, generate
from abliterate.core.prompts import format_conversation
from abliterate.use.serve import create_app, parse_tool_calls

NAME = "tiny-llama-abliterated"
KEY = "sk-test-key"
LIMIT = 256
MAX_BODY = 64 * 1024

# A ChatML-like template that renders tools (so `tools` requests are accepted) and assistant tool calls.
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class Server:
    """uvicorn in a background thread on a socket bound to a free loopback port."""

    def __init__(self, app):
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


@pytest.fixture(scope="module")
def served():
    model = build_tiny_model("llama", max_position_embeddings=1024)
    tokenizer = build_tiny_tokenizer(TOOLS_TEMPLATE)
    probe = {"forwards": 0, "delay": 0.0, "active": 0, "most_active": 0}

    def slow_forward(module, args):  # counts decoding steps; slows them down when a test needs time
        probe["forwards"] += 1
        if probe["delay"]:
            time.sleep(probe["delay"])

    model.register_forward_pre_hook(slow_forward)
    plain_generate = model.generate

    def counted_generate(*args, **kwargs):  # how many generations run at once (must never exceed one)
        probe["active"] += 1
        probe["most_active"] = max(probe["most_active"], probe["active"])
        try:
            return plain_generate(*args, **kwargs)
        finally:
            probe["active"] -= 1

    model.generate = counted_generate
    app = create_app(TransformersEngine(model, tokenizer), NAME, api_key=KEY, max_tokens_limit=LIMIT, max_body_bytes=MAX_BODY)
    server = Server(app)
    yield server, model, tokenizer, app, probe
    server.stop()


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def oll(served):
    return ollama.Client(host=served[0].url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def greedy(model, tokenizer, prompt: str, tokens: int) -> str:
    return generate(model, tokenizer, [prompt], tokens, 1).texts[0]


def greedy_chat(model, tokenizer, messages, tokens):
    return greedy(model, tokenizer, format_conversation(tokenizer, messages), tokens)


def raw(served, method, path, key=KEY, headers=None, **kwargs):
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.request(method, served[0].url + path, headers=headers, timeout=30, **kwargs)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]


def test_openai_chat_equals_greedy_generation_and_the_stream_joins_to_it(served, oai):
    _, model, tokenizer, _, _ = served
    expected = greedy_chat(model, tokenizer, MESSAGES, 24)
    reply = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected and expected
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer(format_conversation(tokenizer, MESSAGES), add_special_tokens=False).input_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 24)
    assert reply.model == NAME and reply.object == "chat.completion"

    chunks = list(oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed, token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_openai_completions_stop_strings_and_model_list(served, oai):
    _, model, tokenizer, _, _ = served
    expected = greedy(model, tokenizer, "Once upon a time", 12)
    completion = oai.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert completion.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in oai.completions.create(model=NAME, prompt="Once upon a time",
                                                                        max_tokens=12, temperature=0, stream=True))
    assert streamed == expected
    # a stop string ends the answer before it
    full = greedy_chat(model, tokenizer, MESSAGES, 24)
    stop = full[6:8]
    cut = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert [m.id for m in oai.models.list()] == [NAME]
    assert oai.models.retrieve(NAME).id == NAME


def test_wrong_or_missing_key_is_401_with_a_json_error(served):
    bad = openai.OpenAI(base_url=served[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=2)
    assert "API key" in caught.value.message
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = raw(served, "GET", "/v1/models", key=None)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=served[0].url, headers={"Authorization": "Bearer wrong"}).list()
    assert caught.value.status_code == 401 and "API key" in caught.value.error
    assert raw(served, "GET", "/api/tags", key=None).json() == {"error": caught.value.error}


def test_malformed_requests_get_4xx_json_errors(served, oai):
    def error_of(response, status=400):
        assert response.status_code == status, response.text
        return response.json()["error"]

    assert "messages" in error_of(raw(served, "POST", "/v1/chat/completions", json={"model": NAME, "messages": "hi"}))["message"]
    assert "not valid JSON" in error_of(raw(served, "POST", "/v1/chat/completions", content=b'{"messages": [',
                                            headers={"Content-Type": "application/json"}))["message"]
    assert error_of(raw(served, "POST", "/v1/chat/completions", json={"model": NAME}))["type"] == "invalid_request_error"
    bad_role = error_of(raw(served, "POST", "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}))
    assert bad_role["param"] == "messages.0.role"
    assert "temperature" in error_of(raw(served, "POST", "/v1/chat/completions",
                                         json={"messages": MESSAGES, "temperature": "hot"}))["message"]
    with pytest.raises(openai.BadRequestError, match="above this server's limit of 256"):
        oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=LIMIT + 1)
    assert error_of(raw(served, "GET", "/v1/nothing"), 404)["type"] == "not_found_error"
    # Ollama endpoints answer in Ollama's error shape
    assert isinstance(error_of(raw(served, "POST", "/api/chat", json={"model": NAME, "messages": {"role": "user"}})), str)
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=served[0].url, headers={"Authorization": f"Bearer {KEY}"}).chat(
            model=NAME, messages=[{"role": "user", "content": "hi"}], options={"num_predict": LIMIT + 1})
    assert caught.value.status_code == 400 and "limit" in caught.value.error


def test_a_body_over_the_limit_is_413(served):
    big = {"messages": [{"role": "user", "content": "x" * MAX_BODY}]}
    response = raw(served, "POST", "/v1/chat/completions", json=big)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]

    def chunked():  # no Content-Length: the bytes really received are counted
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    response = raw(served, "POST", "/api/chat", content=chunked())
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_ollama_client_chat_stream_generate_and_list(served, oll):
    _, model, tokenizer, _, _ = served
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = greedy_chat(model, tokenizer, messages, 20)
    options = {"temperature": 0, "num_predict": 20}
    reply = oll.chat(model=NAME, messages=messages, options=options)
    assert reply.message.content == expected and reply.message.role == "assistant"
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 20
    parts = list(oll.chat(model=NAME, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done and parts[-1].eval_count == 20
    generated = oll.generate(model=NAME, prompt="Tell me a story", options=options)
    assert generated.response == expected  # /api/generate applies the chat template like Ollama
    assert "".join(p.response for p in oll.generate(model=NAME, prompt="Tell me a story", options=options, stream=True)) == expected
    raw_prompt = oll.generate(model=NAME, prompt="Once upon a time", raw=True, options={"temperature": 0, "num_predict": 8})
    assert raw_prompt.response == greedy(model, tokenizer, "Once upon a time", 8)
    listed = oll.list().models
    assert [m.model for m in listed] == [NAME] and listed[0].details.family == "llama" and listed[0].size > 0


def test_concurrent_requests_wait_their_turn_and_all_get_their_own_answer(served, oai):
    _, model, tokenizer, _, probe = served
    questions = [[{"role": "user", "content": f"Question number {n}?"}] for n in range(4)]
    expected = [greedy_chat(model, tokenizer, q, 16) for q in questions]
    probe["most_active"], probe["delay"] = 0, 0.002
    try:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda q: oai.chat.completions.create(model=NAME, messages=q, max_tokens=16,
                                                                          temperature=0).choices[0].message.content,
                                    questions))
    finally:
        probe["delay"] = 0.0
    assert replies == expected
    assert probe["most_active"] == 1  # queued: never two generations at once


def test_a_client_that_disconnects_mid_stream_stops_generation_and_frees_the_slot(served, oai):
    _, model, tokenizer, app, probe = served
    engine = app.state.queue
    probe["delay"] = 0.02  # 200 tokens would take 4 s or more
    try:
        before = probe["forwards"]
        body = {"model": NAME, "messages": MESSAGES, "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", served[0].url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # the first token arrived: hang up
        deadline = time.time() + 5
        while engine.pending and time.time() < deadline:
            time.sleep(0.02)
        assert engine.pending == 0
        assert probe["forwards"] - before < 100  # generation stopped, far short of 200 tokens
    finally:
        probe["delay"] = 0.0
    started = time.time()
    reply = oai.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == greedy_chat(model, tokenizer, MESSAGES, 8)
    assert time.time() - started < 5


def test_a_full_queue_answers_503_with_retry_after(served):
    _, _, _, app, probe = served
    engine = app.state.queue
    engine.max_queue, probe["delay"] = 0, 0.02
    try:
        body = {"model": NAME, "messages": MESSAGES, "max_tokens": 100, "stream": True}
        with httpx.stream("POST", served[0].url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as first:
            lines = first.iter_lines()  # kept: an iterator dropped early would close the connection
            assert first.status_code == 200 and next(lines).startswith("data: ")
            pending = engine.pending
            second = raw(served, "POST", "/v1/chat/completions", json={**body, "stream": False})
        assert second.status_code == 503, (pending, second.status_code, second.text[:300])
        assert second.headers["retry-after"] == "1"
        assert "busy" in second.json()["error"]["message"]
    finally:
        engine.max_queue, probe["delay"] = 16, 0.0
    deadline = time.time() + 5
    while engine.pending and time.time() < deadline:
        time.sleep(0.02)


def scripted(text: str, seen: list):
    """Stands in for generation: records the prompt and streams `text` a few characters at a time."""

    def stream_completion(engine, prompt, max_new_tokens, temperature, top_p, seed=None, cancel=None, stats=None):
        seen.append(prompt)
        stats.update(prompt_tokens=len(prompt), completion_tokens=len(text) // 3)
        for at in range(0, len(text), 3):
            yield text[at:at + 3]

    return stream_completion


def test_tool_calls_for_openai_and_ollama(served, oai, oll, monkeypatch):
    seen: list[str] = []
    answer = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    monkeypatch.setattr(serve_module, "stream_completion", scripted(answer, seen))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = oai.chat.completions.create(model=NAME, messages=messages, tools=tools)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "Tools: get_weather" in seen[-1]  # the template rendered the tools
    chunks = list(oai.chat.completions.create(model=NAME, messages=messages, tools=tools, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Checking."
    streamed_calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [(t.function.name, json.loads(t.function.arguments)) for t in streamed_calls] == [("get_weather", {"city": "Paris"})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the assistant's call and the tool's result go back through the template
    follow_up = messages + [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
                            {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
    oai.chat.completions.create(model=NAME, messages=follow_up, tools=tools)
    assert '<tool_call>{"arguments": {"city": "Paris"}, "name": "get_weather"}</tool_call>' in seen[-1]
    assert "<|tool|>18 C" in seen[-1]

    ollama_reply = oll.chat(model=NAME, messages=messages, tools=tools)
    assert ollama_reply.message.tool_calls[0].function.name == "get_weather"
    assert ollama_reply.message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_thoughts_come_apart_from_the_answer(served, oai, oll, monkeypatch):
    monkeypatch.setattr(serve_module, "stream_completion", scripted("<think>\nsmall sums are easy\n</think>\n\n4.", []))
    message = oai.chat.completions.create(model=NAME, messages=MESSAGES).choices[0].message
    assert message.content == "4." and message.model_extra["reasoning_content"] == "\nsmall sums are easy\n"
    chunks = list(oai.chat.completions.create(model=NAME, messages=MESSAGES, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "4."
    reply = oll.chat(model=NAME, messages=MESSAGES)
    assert (reply.message.content, reply.message.thinking) == ("4.", "\nsmall sums are easy\n")
    assert oll.show(NAME).capabilities == ["completion", "tools"]


def test_tools_on_a_template_without_them_are_refused(served):
    from fastapi.testclient import TestClient

    app = create_app(TransformersEngine(served[1], build_tiny_tokenizer()), NAME)  # conftest's template knows nothing of tools
    response = TestClient(app).post("/v1/chat/completions", json={"messages": MESSAGES, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}}]})
    assert response.status_code == 400 and "does not render tools" in response.json()["error"]["message"]


def test_tool_call_parsing():
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>') == ("", [{"name": "f", "arguments": {"a": 1}}])
    assert parse_tool_calls('hi <tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}') == ("hi", [{"name": "f", "arguments": {"a": 1}}])
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


def test_serve_refuses_a_port_in_use_in_one_line_before_loading(tiny_model_dir, monkeypatch):
    from abliterate.cli import commands as cli

    monkeypatch.setattr(cli, "_load", lambda *args: pytest.fail("the model was loaded before the port was checked"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli.main, ["serve", str(tiny_model_dir), "--port", str(port)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: port {port} is in use; choose another with --port"]


def test_the_serve_command_end_to_end_with_inference_time_ablation(tiny_model_dir, tmp_path):
    """The real command in a subprocess: a base model ablated on the fly, an API key from the environment."""
    import os
    import signal
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.measure.ablation import AblationParams, ablate, plan_edits
    from abliterate.core.arch import adapter_for
    from abliterate.measure.directions import Directions

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter = adapter_for(model)
    messages = [{"role": "user", "content": "Tell me a story"}]
    prompt = format_conversation(tokenizer, messages)
    favourite = generate(model, tokenizer, [prompt], 1, 1).tokens[0][0]  # remove the direction of its first token
    unembedding = model.lm_head.weight.detach()
    direction = torch.nn.functional.normalize(unembedding[favourite] - unembedding.mean(0), dim=0)
    directions = direction.expand(adapter.n_layers, -1).clone()
    Directions(directions, metadata={"model": "random"}).save(tmp_path / "d.safetensors")
    plain = greedy(model, tokenizer, prompt, 8)
    with ablate(plan_edits(adapter, directions, AblationParams.single_direction(2, 1.0))):
        ablated = greedy(model, tokenizer, prompt, 8)
    assert plain != ablated

    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "abliterate.cli", "serve", str(tiny_model_dir), "--port", str(port), "--dtype",
               "float32", "--directions", str(tmp_path / "d.safetensors"), "--layer", "2", "--name", "story"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "ABLITERATE_API_KEY": KEY})
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving story on http://127.0.0.1:{port}"), (line, process.stderr.read() if process.poll() else "")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.time() + 20
        while True:  # the socket listens before uvicorn starts answering
            try:
                reply = client.chat.completions.create(model="story", messages=messages, max_tokens=8, temperature=0)
                break
            except openai.APIConnectionError:
                assert time.time() < deadline
                time.sleep(0.1)
        assert reply.choices[0].message.content == ablated
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(20)
