"""Chat: streamed replies equal greedy generation, thoughts are shown apart, history and commands work,
inference-time ablation changes what the model says, and the terminal command runs in a pseudo-terminal."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer, pty_run

from abliterate.measure.ablation import AblationParams, ablate, plan_edits
from abliterate.core.arch import adapter_for
from abliterate.use.chat import Conversation, chat_loop, split_thoughts, stream_reply
from abliterate.measure.directions import Directions
from abliterate.measure.engines.transformers import TransformersEngine, generate
from abliterate.core.prompts import format_conversation


def test_thoughts_are_split_from_the_answer_even_when_tags_are_cut_across_chunks():
    chunks = ["<thi", "nk>let me ", "see</th", "ink>\n\nThe answer", " is 4.<", "3"]
    events = list(split_thoughts(chunks))
    assert "".join(t for k, t in events if k == "thought") == "let me see"
    assert "".join(t for k, t in events if k == "answer") == "\n\nThe answer is 4.<3"
    assert list(split_thoughts(["plain", " text"])) == [("answer", "plain"), ("answer", " text")]


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model("llama"), build_tiny_tokenizer()


def greedy(model, tokenizer, messages, tokens):
    return generate(model, tokenizer, [format_conversation(tokenizer, messages)], tokens, 1).texts[0]


def test_streamed_reply_is_the_greedy_continuation(llama):
    model, tokenizer = llama
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    assert "".join(stream_reply(TransformersEngine(model, tokenizer), messages, max_new_tokens=10)) == greedy(model, tokenizer, messages, 10)


def test_chat_loop_keeps_history_and_obeys_commands(llama, tmp_path):
    model, tokenizer = llama
    lines = iter(["/system Be brief.", "hello", "/save " + str(tmp_path / "talk.json"), "/reset", "again", "/nope", "exit"])
    shown: list[tuple[str, str]] = []
    conversation = chat_loop(TransformersEngine(model, tokenizer), lambda prompt: next(lines), lambda kind, text: shown.append((kind, text)),
                             max_new_tokens=6)
    saved = json.loads((tmp_path / "talk.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[1]["content"] == "hello"
    first_answer = greedy(model, tokenizer, saved[:2], 6)
    assert saved[2]["content"] == first_answer.strip()
    # after /reset only the new turn is in the history; the system prompt stays
    assert [m["content"] for m in conversation.messages()][:2] == ["Be brief.", "again"]
    assert len(conversation.turns) == 2
    assert any(kind == "info" and "unknown command /nope" in text for kind, text in shown)


def test_end_of_input_leaves_the_loop(llama):
    model, tokenizer = llama

    def read(prompt):
        raise EOFError

    assert chat_loop(TransformersEngine(model, tokenizer), read, lambda kind, text: None).turns == []


def test_conversation_save_is_atomic(tmp_path):
    path = Conversation("sys", [{"role": "user", "content": "hi"}]).save(tmp_path / "c.json")
    assert json.loads(path.read_text())["messages"][0] == {"role": "system", "content": "sys"}
    assert not list(tmp_path.glob("*.partial"))


def test_chat_command_in_a_pseudo_terminal_with_inference_time_ablation(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    adapter = adapter_for(model)
    # the direction of the token this random model always picks: removing it changes what it says
    unembedding = model.lm_head.weight.detach()
    favourite = int(greedy_ids(model, tokenizer)[0])
    direction = torch.nn.functional.normalize(unembedding[favourite] - unembedding.mean(0), dim=0)
    directions = direction.expand(adapter.n_layers, -1).clone()
    Directions(directions, metadata={"model": "random"}).save(tmp_path / "d.safetensors")
    messages = [{"role": "user", "content": "Tell me a story"}]
    plain = greedy(model, tokenizer, messages, 8)
    with ablate(plan_edits(adapter, directions, AblationParams.single_direction(2, 1.0))):
        ablated = greedy(model, tokenizer, messages, 8)
    assert plain != ablated  # the test can tell the two apart

    command = [sys.executable, "-m", "abliterate.cli", "chat", str(tiny_model_dir), "--dtype", "float32",
               "--max-new-tokens", "8", "--directions", str(tmp_path / "d.safetensors"), "--layer", "2"]
    saved = tmp_path / "talk.json"
    answers = [(">>> ", "Tell me a story\r"), (">>> ", f"/save {saved}\r"), (">>> ", "quit\r")]
    code, output, pending = pty_run(command, answers, timeout=120)
    assert code == 0 and not pending, output[-2000:]
    assert json.loads(saved.read_text())["messages"][-1]["content"] == ablated.strip()


def greedy_ids(model, tokenizer):
    prompt = format_conversation(tokenizer, [{"role": "user", "content": "Tell me a story"}])
    return generate(model, tokenizer, [prompt], 4, 1).tokens[0]
