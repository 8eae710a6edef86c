"""Ollama export: a Modelfile (FROM, TEMPLATE, stop parameters, SYSTEM) beside a GGUF, and `ollama create`.

Ollama prompts a model through a Go text/template, not the Hugging Face Jinja chat template. We render probe
conversations through the model's own chat template (from the HF tokenizer or the GGUF's `tokenizer.chat_template`),
recognise the family (chatml incl. Qwen2.5 tools, llama3, gemma, mistral, phi3), read the family's variable parts
from the renders (default system prompt, Llama 3.1's date preamble, Qwen's tool instructions, Mistral's spacing),
and check that the family's prompt, filled with those parts, reproduces every probe exactly. Only then is the
family's Go template written. Otherwise no TEMPLATE is written and Ollama derives one from the GGUF itself.

What Ollama's render then differs in, by design: the leading BOS token (Ollama's tokenizer adds it), and JSON
layout of tool definitions and tool-call arguments (Go writes compact JSON, Jinja's `tojson` puts spaces after
`:` and `,`). Message contents are not `trim`-med as some HF templates do (Go templates have no trim).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from abliterate.errors import UserError

MODELFILE_NAME = "Modelfile"
# Ollama model names: [host/][namespace/]model[:tag], lowercase here (the CLI's own convention)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*){0,2}(:[a-z0-9_][a-z0-9._-]{0,127})?$")


@dataclass(frozen=True)
class ChatTemplate:
    """A Hugging Face (Jinja) chat template with the special tokens it may print."""

    source: str
    bos_token: str | None = None
    eos_token: str | None = None

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        """Exactly what `tokenizer.apply_chat_template(..., tokenize=False)` gives (same Jinja environment)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        tokens = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v is not None}
        rendered, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=self.source,
                                            add_generation_prompt=add_generation_prompt, **tokens)
        return rendered[0]

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt with the generation prompt, less the template's leading `bos_token` (the runtime's tokenizer adds
        BOS itself): what an Ollama TEMPLATE has to produce."""
        text = self.render(messages, tools)
        if self.bos_token and "bos_token" in self.source and text.startswith(self.bos_token):
            text = text[len(self.bos_token):]
        return text

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatTemplate | None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if not template:
            return None
        return cls(template, getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None))


@dataclass
class OllamaTemplate:
    """What goes into the Modelfile for the prompt format."""

    family: str  # chatml, llama3, gemma, mistral, phi3; 'user' (--template); 'gguf' (left to Ollama)
    template: str | None  # the Go template; None: Ollama derives it from the GGUF's chat template
    stops: tuple[str, ...] = ()
    tools: bool = False
    warnings: list[str] = field(default_factory=list)


# --- probe conversations ---------------------------------------------------------------------------------------

_SYSTEM = "You answer in one short sentence."
_USER, _ASSISTANT, _USER2 = "What is the capital of France?", "Paris.", "And of Italy?"
_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}},
                   "required": ["city"]}}}
_TOOL_USER = "What is the weather in Paris?"
_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def _m(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


_PLAIN = [[_m("user", _USER)], [_m("user", _USER), _m("assistant", _ASSISTANT), _m("user", _USER2)]]
_WITH_SYSTEM = [[_m("system", _SYSTEM), *conversation] for conversation in _PLAIN]
_WITH_TOOLS = [
    [_m("user", _TOOL_USER)],
    [_m("system", _SYSTEM), _m("user", _TOOL_USER)],
    [_m("user", _TOOL_USER), _m("assistant", "", tool_calls=[_CALL]), _m("tool", "18 C, sunny")],
    [_m("user", _TOOL_USER), _m("assistant", "Checking.", tool_calls=[_CALL, _CALL]), _m("tool", "18 C"), _m("tool", "19 C"),
     _m("assistant", "18 C."), _m("user", _USER2)],
]


def _hf_json(value) -> str:
    """Jinja `tojson` as transformers defines it."""
    return json.dumps(value, ensure_ascii=False)


def _system_of(messages: list[dict]) -> str:
    """Ollama's .System: every system message, joined by a blank line."""
    return "\n\n".join(m["content"] for m in messages if m["role"] == "system")


def _lit(text: str) -> str:
    """A Go template action printing `text` (a Go string literal): safe from trim markers, `{{`, `\"\"\"` and from the
    Modelfile parser, which drops non-printable characters."""
    if not text:
        return ""
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif not char.isprintable():
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return '{{ "' + "".join(out) + '" }}'


# --- families: read the variable parts, a Go template, and the prompt it gives (to check against the HF render) ---

@dataclass(frozen=True)
class _Family:
    name: str
    marker: str  # appears in every prompt of the family
    stops: tuple[str, ...]
    read: Callable[[ChatTemplate], dict | None]  # the variable parts, read from renders; None: not this family
    go: Callable[[dict], str]  # the Go template
    expect: Callable[[dict, list[dict], list[dict] | None], str]  # the prompt the Go template gives (HF's JSON layout)
    tools: Callable[[ChatTemplate, dict], dict | None] | None = None  # tool parts, None: no tool support read


def _after(text: str, prefix: str) -> str | None:
    return text[len(prefix):] if text.startswith(prefix) else None


# chatml: Qwen2/2.5 (with tools), SmolLM2, Hermes, ...

def _chatml_read(chat: ChatTemplate) -> dict | None:
    text = chat.prompt(_PLAIN[0])
    default = None
    if (rest := _after(text, "<|im_start|>system\n")) is not None:
        default, _, _ = rest.partition("<|im_end|>\n")
    return {"default_system": default}


def _chatml_tools(chat: ChatTemplate, params: dict) -> dict | None:
    tool_json = "\n" + _hf_json(_TOOL)
    with_system = _after(chat.prompt(_WITH_TOOLS[1], [_TOOL]), "<|im_start|>system\n" + _SYSTEM)
    without = _after(chat.prompt(_WITH_TOOLS[0], [_TOOL]), "<|im_start|>system\n")
    if with_system is None or without is None or tool_json not in with_system:
        return None
    prefix, _, rest = with_system.partition(tool_json)
    suffix, found, _ = rest.partition("<|im_end|>\n<|im_start|>user\n")
    default, found_prefix, _ = without.partition(prefix)
    if not (found and found_prefix and prefix):
        return None
    return {"prefix": prefix, "suffix": suffix, "default_system": default}


def _chatml_go(p: dict) -> str:
    tools = p.get("tools")
    head = ""
    if tools:
        head = ("{{- if .Tools }}<|im_start|>system\n{{ if .System }}{{ .System }}{{ else }}" + _lit(tools["default_system"])
                + "{{ end }}" + _lit(tools["prefix"]) + "\n{{- range .Tools }}\n{{ . }}\n{{- end }}" + _lit(tools["suffix"])
                + "<|im_end|>\n{{ else if .System }}")
    else:
        head = "{{- if .System }}"
    head += "<|im_start|>system\n{{ .System }}<|im_end|>\n"
    if p["default_system"] is not None:
        head += "{{ else }}<|im_start|>system\n" + _lit(p["default_system"]) + "<|im_end|>\n"
    head += "{{ end }}\n"
    if not tools:
        return head + """\
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""
    return head + """\
{{- $prev := "" }}
{{- range .Messages }}
{{- if and (eq $prev "tool") (ne .Role "tool") }}<|im_end|>
{{ end }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if and (eq .Role "assistant") .ToolCalls }}<|im_start|>assistant
{{- if .Content }}
{{ .Content }}
{{- end }}
{{- range .ToolCalls }}
<tool_call>
{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ else if eq .Role "tool" }}
{{- if ne $prev "tool" }}<|im_start|>user{{ end }}
<tool_response>
{{ .Content }}
</tool_response>
{{- end }}
{{- $prev = .Role }}
{{- end }}
{{- if eq $prev "tool" }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def _chatml_expect(p: dict, messages: list[dict], tools: list[dict] | None) -> str:
    system, spec = _system_of(messages), p.get("tools")
    if tools and spec:
        out = ("<|im_start|>system\n" + (system or spec["default_system"]) + spec["prefix"]
               + "".join("\n" + _hf_json(t) for t in tools) + spec["suffix"] + "<|im_end|>\n")
    elif system or p["default_system"] is not None:
        out = f"<|im_start|>system\n{system or p['default_system']}<|im_end|>\n"
    else:
        out = ""
    prev = ""
    for m in messages:
        role, content = m["role"], m["content"]
        if prev == "tool" and role != "tool":
            out += "<|im_end|>\n"
        if role == "assistant" and m.get("tool_calls") and spec:
            out += "<|im_start|>assistant" + ("\n" + content if content else "")
            for call in m["tool_calls"]:
                function = call["function"]
                out += f'\n<tool_call>\n{{"name": "{function["name"]}", "arguments": {_hf_json(function["arguments"])}}}\n</tool_call>'
            out += "<|im_end|>\n"
        elif role in ("user", "assistant"):
            out += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        elif role == "tool" and spec:
            out += ("" if prev == "tool" else "<|im_start|>user") + f"\n<tool_response>\n{content}\n</tool_response>"
        prev = role
    return out + ("<|im_end|>\n" if prev == "tool" and spec else "") + "<|im_start|>assistant\n"


# llama3: Llama 3 / 3.1 / 3.2 / 3.3 instruct (3.1+ always writes a system turn with a date preamble)

_L3_SYSTEM = "<|start_header_id|>system<|end_header_id|>\n\n"


def _llama3_read(chat: ChatTemplate) -> dict | None:
    rest = _after(chat.prompt(_PLAIN[0]), _L3_SYSTEM)
    if rest is not None:
        preamble, found, _ = rest.partition("<|eot_id|>")
        return {"always_system": True, "preamble": preamble} if found else None
    try:
        rest = _after(chat.prompt(_WITH_SYSTEM[0]), _L3_SYSTEM) or ""
    except Exception:
        return {"always_system": False, "preamble": ""}
    content, _, _ = rest.partition("<|eot_id|>")
    return {"always_system": False, "preamble": content[: -len(_SYSTEM)] if content.endswith(_SYSTEM) else ""}


def _llama3_go(p: dict) -> str:
    system = _L3_SYSTEM + _lit(p["preamble"]) + "{{ .System }}<|eot_id|>"
    head = system if p["always_system"] else "{{- if .System }}" + system + "\n{{- end }}"
    return head + """
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""


def _llama3_expect(p: dict, messages: list[dict], tools: list[dict] | None) -> str:
    system = _system_of(messages)
    out = f"{_L3_SYSTEM}{p['preamble']}{system}<|eot_id|>" if system or p["always_system"] else ""
    for m in messages:
        if m["role"] != "system":
            out += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return out + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# gemma: Gemma 2 / 3 (no system role: the system prompt opens the first user turn)

def _gemma_read(chat: ChatTemplate) -> dict | None:
    try:
        rest = _after(chat.prompt(_WITH_SYSTEM[0]), "<start_of_turn>user\n" + _SYSTEM)
    except Exception:  # Gemma 2 refuses system messages: merge the way Gemma 3 does
        return {"separator": "\n\n"}
    if rest is None or _USER not in rest:
        return None
    return {"separator": rest.partition(_USER)[0]}


def _gemma_go(p: dict) -> str:
    return """\
{{- $system := .System }}
{{- range .Messages }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}""" + _lit(p["separator"]) + """{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""


def _gemma_expect(p: dict, messages: list[dict], tools: list[dict] | None) -> str:
    out, system = "", _system_of(messages)
    for m in messages:
        if m["role"] == "user":
            out += "<start_of_turn>user\n" + (system + p["separator"] if system else "") + m["content"] + "<end_of_turn>\n"
            system = ""
        elif m["role"] == "assistant":
            out += f"<start_of_turn>model\n{m['content']}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


# mistral: [INST] ... [/INST] (v0.1-v0.3, Nemo); the system prompt opens the last user turn

def _mistral_read(chat: ChatTemplate) -> dict | None:
    text = chat.prompt(_PLAIN[1])
    pattern = (r"(\[INST\] ?)" + re.escape(_USER) + r"( ?\[/INST\])(.*?)" + re.escape(_ASSISTANT) + r"(.*?)\1"
               + re.escape(_USER2) + r"\2")
    found = re.fullmatch(pattern, text, re.DOTALL)
    if not found:
        return None
    params = dict(zip(("open", "close", "assistant_prefix", "assistant_suffix"), found.groups()))
    params["separator"] = "\n\n"
    try:
        last = chat.prompt(_WITH_SYSTEM[0])
    except Exception:  # v0.1/v0.2 refuse system messages: place it the way v0.3 does
        return params
    rest = _after(last, params["open"] + _SYSTEM)
    if rest is not None and _USER in rest:
        params["separator"] = rest.partition(_USER)[0]
    return params


def _mistral_go(p: dict) -> str:
    return ("{{- range $i, $_ := .Messages }}\n{{- if eq .Role \"user\" }}" + _lit(p["open"])
            + "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}" + _lit(p["separator"]) + "{{ end }}"
            + "{{ .Content }}" + _lit(p["close"]) + "\n{{- else if eq .Role \"assistant\" }}" + _lit(p["assistant_prefix"])
            + "{{ .Content }}" + _lit(p["assistant_suffix"]) + "\n{{- end }}\n{{- end }}")


def _mistral_expect(p: dict, messages: list[dict], tools: list[dict] | None) -> str:
    out, system = "", _system_of(messages)
    for i, m in enumerate(messages):
        if m["role"] == "user":
            opening = system + p["separator"] if system and i == len(messages) - 1 else ""
            out += p["open"] + opening + m["content"] + p["close"]
        elif m["role"] == "assistant":
            out += p["assistant_prefix"] + m["content"] + p["assistant_suffix"]
    return out


# phi3: Phi-3 / 3.5 instruct

def _phi3_go(p: dict) -> str:
    return """\
{{- range .Messages }}
{{- if or (eq .Role "user") (eq .Role "assistant") (and (eq .Role "system") .Content) }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}
{{- end }}<|assistant|>
"""


def _phi3_expect(p: dict, messages: list[dict], tools: list[dict] | None) -> str:
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages
                  if m["role"] in ("user", "assistant") or (m["role"] == "system" and m["content"]))
    return out + "<|assistant|>\n"


FAMILIES = (
    _Family("chatml", "<|im_start|>", ("<|im_start|>", "<|im_end|>"), _chatml_read, _chatml_go, _chatml_expect, _chatml_tools),
    _Family("llama3", "<|start_header_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            _llama3_read, _llama3_go, _llama3_expect),
    _Family("gemma", "<start_of_turn>", ("<start_of_turn>", "<end_of_turn>"), _gemma_read, _gemma_go, _gemma_expect),
    _Family("mistral", "[INST]", ("[INST]", "[/INST]"), _mistral_read, _mistral_go, _mistral_expect),
    _Family("phi3", "<|user|>", ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"),
            lambda chat: {}, _phi3_go, _phi3_expect),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def _reproduces(chat: ChatTemplate, family: _Family, params: dict, conversations, tools=None) -> bool | None:
    """True: every conversation's HF prompt is the family's; False: one differs; None: the HF template refused one."""
    for messages in conversations:
        try:
            hf = chat.prompt(messages, tools)
        except Exception:
            return None
        if hf != family.expect(params, messages, tools):
            return False
    return True


def _match(chat: ChatTemplate, family: _Family) -> tuple[dict, list[str]] | None:
    try:
        if family.marker not in chat.prompt(_PLAIN[0]):
            return None
        params = family.read(chat)
    except Exception:
        return None
    if params is None or not _reproduces(chat, family, params, _PLAIN):
        return None
    warnings = []
    with_system = _reproduces(chat, family, params, _WITH_SYSTEM)
    if with_system is False:
        return None
    if with_system is None:
        warnings.append(f"the model's chat template has no system role; a system prompt is placed the {family.name} way")
    if family.tools is not None:
        try:
            spec = family.tools(chat, params)
        except Exception:
            spec = None
        if spec is not None and _reproduces(chat, family, {**params, "tools": spec}, _WITH_TOOLS, [_TOOL]):
            params["tools"] = spec
    return params, warnings


def translate(chat: ChatTemplate | None) -> OllamaTemplate:
    """The Ollama template of an HF chat template, checked on probe conversations; 'gguf' when none fits."""
    if chat is None:
        return OllamaTemplate("gguf", None, warnings=["the model has no chat template: Ollama will send raw prompts; give --template FILE"])
    for family in FAMILIES:
        found = _match(chat, family)
        if found is not None:
            params, warnings = found
            return OllamaTemplate(family.name, family.go(params), family.stops, bool(params.get("tools")), warnings)
    return OllamaTemplate("gguf", None, warnings=[
        f"chat template not recognised (known: {', '.join(FAMILY_NAMES)}); no TEMPLATE written: Ollama derives one from "
        "the GGUF's tokenizer.chat_template, which may not match it exactly; give --template FILE to set it"])


def detect_template_family(source) -> str | None:
    """The family name of a chat template (a ChatTemplate, an HF tokenizer, or a Jinja string), None if unknown."""
    if isinstance(source, str):
        source = ChatTemplate(source)
    elif not isinstance(source, ChatTemplate):
        source = ChatTemplate.from_tokenizer(source)
    result = translate(source)
    return None if result.family == "gguf" else result.family


# --- reading chat templates ------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: str | Path, keys: set[str]) -> dict:
    """The values of `keys` in a GGUF's key-value header, read straight from the file: the header only, in well
    under a second (gguf.GGUFReader indexes every tensor and every vocabulary string first: seconds)."""
    import mmap
    import struct

    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    found: dict = {}
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] not in (2, 3):
                raise ValueError("not a little-endian GGUF v2/v3 file")
            (kv_count,) = struct.unpack_from("<Q", data, 16)
            offset = 24

            def string(at: int) -> tuple[str, int]:
                (length,) = struct.unpack_from("<Q", data, at)
                if at + 8 + length > len(data):
                    raise ValueError("truncated string")
                return data[at + 8: at + 8 + length].decode("utf-8", errors="replace"), at + 8 + length

            def value(kind: int, at: int, keep: bool):
                if kind in _GGUF_SCALARS:
                    fmt = "<" + _GGUF_SCALARS[kind]
                    return struct.unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)
                if kind == _GGUF_STRING:
                    return string(at)
                if kind != _GGUF_ARRAY:
                    raise ValueError(f"unknown value type {kind}")
                item_kind, count = struct.unpack_from("<IQ", data, at)
                at += 12
                if item_kind in _GGUF_SCALARS and not keep:  # fixed size: skip it whole
                    return None, at + count * struct.calcsize(_GGUF_SCALARS[item_kind])
                items = []
                for _ in range(count):
                    item, at = value(item_kind, at, keep)
                    if keep:
                        items.append(item)
                return items, at

            for _ in range(kv_count):
                key, offset = string(offset)
                (kind,) = struct.unpack_from("<I", data, offset)
                result, offset = value(kind, offset + 4, key in keys)
                if key in keys:
                    found[key] = result
                if len(found) == len(keys):
                    break
    except (ValueError, struct.error, OSError) as error:
        raise UserError(f"cannot read {path} as GGUF ({str(error)[:120]})") from None
    return found


def read_gguf_chat_template(path: str | Path) -> ChatTemplate | None:
    """The chat template and BOS/EOS strings in a GGUF's metadata (None when it has no chat template)."""
    keys = {"tokenizer.chat_template", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"}
    meta = gguf_metadata(path, keys)
    template = meta.get("tokenizer.chat_template")
    if not isinstance(template, str) or not template:
        return None
    tokens = meta.get("tokenizer.ggml.tokens") or []

    def token(key: str) -> str | None:
        index = meta.get(key)
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    return ChatTemplate(template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))


def read_hf_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The chat template of a Hugging Face model directory's tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:
        raise UserError(f"cannot load the tokenizer of {model_dir} ({type(error).__name__}: {str(error)[:120]})") from None
    return ChatTemplate.from_tokenizer(tokenizer)


def template_from_file(path: str | Path, model_chat: ChatTemplate | None) -> OllamaTemplate:
    """--template FILE: a Jinja chat template (translated like the model's own) or an Ollama Go template (used as is;
    the stop words still come from the model's own template when its family is known)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"template file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    if "{%" in text or Path(path).suffix in (".jinja", ".j2"):
        bos, eos = (model_chat.bos_token, model_chat.eos_token) if model_chat else (None, None)
        result = translate(ChatTemplate(text, bos, eos))
        if result.template is None:
            raise UserError(f"the Jinja template in {path} is not of a known family ({', '.join(FAMILY_NAMES)}); "
                            "give an Ollama (Go) template instead")
        return result
    stops = translate(model_chat).stops if model_chat else ()
    return OllamaTemplate("user", text, stops, ".Tools" in text)


# --- the Modelfile ---------------------------------------------------------------------------------------------

def _check_text(what: str, text: str) -> None:
    if '"""' in text:
        raise UserError(f'{what} contains """, which cannot be written in a Modelfile')
    bad = sorted({repr(c) for c in text if not c.isprintable() and c not in "\n\t\r"})
    if bad:
        raise UserError(f"{what} contains characters the Modelfile parser drops: {', '.join(bad)}")


def _quote(value: str) -> str:
    """A Modelfile argument: "..." or, for text with newlines or quotes, \"\"\"...\"\"\"."""
    if "\n" in value or '"' in value or value != value.strip():
        return f'"""{value}"""'
    return f'"{value}"'


def modelfile(source: str, template: str | None = None, stops: tuple[str, ...] | list[str] = (), system: str | None = None,
              parameters: dict[str, object] | None = None, comment: str | None = None) -> str:
    """Modelfile text: FROM, TEMPLATE, SYSTEM, one PARAMETER line per stop word and per parameter."""
    if not source or "\n" in source or '"' in source:
        raise UserError(f"cannot write FROM {source!r} in a Modelfile")
    lines = [f"# {line}" for line in (comment or "").splitlines()]
    lines.append(f"FROM {_quote(source) if ' ' in source else source}")
    if template is not None:
        _check_text("the template", template)
        lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        _check_text("the system prompt", system)
        lines.append(f"SYSTEM {_quote(system)}")
    for stop in stops:
        _check_text("a stop word", stop)
        lines.append(f"PARAMETER stop {_quote(stop)}")
    for key, value in (parameters or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise UserError(f"invalid parameter name {key!r}")
        lines.append(f"PARAMETER {key} {_quote(value) if isinstance(value, str) else json.dumps(value)}")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> Path:
    """Write through a temporary file in the same directory, renamed into place: never a half-written file."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise UserError(f"invalid Ollama model name {name!r}: use lowercase letters, digits and - _ . (e.g. "
                        "'qwen-abliterated' or 'me/qwen-abliterated:0.5b'), with at most one ':' before the tag")
    return name


def create_command(name: str, modelfile_path: Path) -> list[str]:
    return ["ollama", "create", name, "-f", str(modelfile_path)]


@dataclass
class OllamaExport:
    modelfile: Path
    template: OllamaTemplate
    command: list[str]
    created: bool  # `ollama create` ran and succeeded

    @property
    def command_line(self) -> str:
        return shlex.join(self.command)


def export_ollama(model: str | Path, name: str, template_file: str | Path | None = None, system: str | None = None,
                  out_dir: str | Path | None = None, create: bool = True) -> OllamaExport:
    """Write a Modelfile for a GGUF (beside it, or in out_dir) and run `ollama create` when ollama is on PATH."""
    check_name(name)
    path = Path(model).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a directory: Ollama imports a GGUF; convert it first with `abliterate export gguf {path}`")
    if not path.exists():
        raise UserError(f"file not found: {path}")
    if path.suffix.lower() != ".gguf":
        raise UserError(f"{path} is not a .gguf file")
    chat = read_gguf_chat_template(path)
    result = template_from_file(template_file, chat) if template_file else translate(chat)
    target = Path(out_dir).expanduser() if out_dir else path.parent
    if not target.is_dir():
        raise UserError(f"directory {target} does not exist; create it or choose another -o")
    source = f"./{path.name}" if target.resolve() == path.parent.resolve() else str(path.resolve())
    text = modelfile(source, result.template, result.stops, system,
                     comment=f"Ollama Modelfile for {path.name}, written by abliterate (template: {result.family})\n"
                             f"import it: ollama create {name} -f Modelfile")
    written = write_atomic(target / MODELFILE_NAME, text).resolve()
    command = create_command(name, written)
    executable = shutil.which("ollama") if create else None
    created = False
    if executable:
        completed = subprocess.run([executable, *command[1:]], check=False)
        if completed.returncode != 0:
            raise UserError(f"`{shlex.join(command)}` failed with exit code {completed.returncode}; the Modelfile is {written}")
        created = True
    return OllamaExport(written, result, command, created)
