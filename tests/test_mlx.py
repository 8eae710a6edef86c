"""MLX compatibility: a model abliterated and saved by `save_hf` loads in `mlx_lm` and computes what transformers
computes — the same next-token logits (float32, to 1e-4) and the same greedy first tokens.

Runs on Linux through MLX's CPU backend (`pip install "mlx[cpu]" mlx-lm`); skipped where mlx_lm is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")
from conftest import _DENSE, _VISION_SMALL, ARCH_CONFIGS, build_tiny_model, build_tiny_tokenizer  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402

from abliterate.measure.ablation import AblationParams, bake, plan_edits  # noqa: E402
from abliterate.core.arch import adapter_for  # noqa: E402
from abliterate.core.save import save_hf  # noqa: E402

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=16)
_GEMMA3_ROPE = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),  # as Gemma 3 4B and up
                "sliding_attention": dict(rope_type="default", rope_theta=1e4)}

# case id → (model_type, overrides). Overrides make the tiny model look like the real family where mlx_lm assumes
# it does (Phi-3.5-MoE has biases; Gemma 3 a global-attention layer every 6th layer; GPT-NeoX an MLP of 4 × hidden,
# and mlx_lm always runs its GELU in the tanh approximation, transformers' `gelu_fast`), or exercise settings mlx_lm
# must read from config.json (non-default rope theta and scaling).
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", dict(rope_parameters=_LLAMA3_ROPE)),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
    "phimoe": ("phimoe", dict(attention_bias=True, lm_head_bias=True)),
    "deepseek_v3": ("deepseek_v3", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", dict(num_hidden_layers=6)),
    "gemma3_text-linear-rope": ("gemma3_text", dict(num_hidden_layers=6, rope_parameters=_GEMMA3_ROPE)),
    "phi3": ("phi3", {}),
    "phi": ("phi", {}),
    "granite": ("granite", {}),
    "olmo2": ("olmo2", {}),
    "gpt_neox": ("gpt_neox", dict(intermediate_size=4 * _DENSE["hidden_size"], hidden_act="gelu_fast")),
    # vision-language models: mlx_lm loads the text tower and drops the vision weights
    "gemma3": ("gemma3", dict(text_config=dict(_DENSE, head_dim=16, num_hidden_layers=6), vision_config=_VISION_SMALL,
                              mm_tokens_per_image=4, image_token_index=319, boi_token_index=317, eoi_token_index=318,
                              vocab_size=320)),
    "llava": ("llava", {}),
}

# families the adapters support that mlx_lm (0.32) cannot load
NOT_IN_MLX = {
    "falcon": "mlx_lm has no falcon model",
    "gpt_oss": "mlx_lm expects the original fused gate_up_proj expert layout, transformers 5 writes split experts",
    "gpt2": "mlx_lm reads only the original OpenAI checkpoint layout (h.N.*), not transformers' (transformer.h.N.*)",
}

PROMPTS = ["How do I pick a lock?", "Write a haiku about the sea.", "Explain recursion to a child, briefly."]
NEW_TOKENS = 6
ATOL = RTOL = 1e-4  # float32 on both sides: observed differences are ~5e-6 on logits of magnitude ~3
TIE = 10 * ATOL  # greedy choices closer than this may legitimately differ between the two runtimes


def test_every_family_is_covered():
    """A family added to the adapters must be added here, or recorded as one mlx_lm cannot load."""
    assert {model_type for model_type, _ in CASES.values()} | set(NOT_IN_MLX) == set(ARCH_CONFIGS)


def _abliterated(case, monkeypatch):
    model_type, overrides = CASES[case]
    if model_type in ("gemma3", "llava"):  # build_tiny_model takes a vision-language config whole from ARCH_CONFIGS
        if overrides:
            monkeypatch.setitem(ARCH_CONFIGS, model_type, overrides)
        model = build_tiny_model(model_type)
    else:
        model = build_tiny_model(model_type, **overrides)
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(1)
    directions = torch.nn.functional.normalize(torch.randn(adapter.n_layers, adapter.hidden_size, generator=generator), dim=-1)
    return model, lambda: bake(plan_edits(adapter, directions, AblationParams.single_direction(1.0, 1.0)))


@torch.no_grad()
def _torch_logits(model, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@torch.no_grad()
def _torch_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation by full forwards, with each step's top-1/top-2 logit gap."""
    seq, tokens, margins = list(ids), [], []
    for _ in range(n):
        top = model(input_ids=torch.tensor([seq])).logits[0, -1].float().topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        tokens.append(int(top.indices[0]))
        seq.append(tokens[-1])
    return tokens, margins


def _mlx_greedy(model, ids: list[int], n: int) -> list[int]:
    """mlx_lm's own generation loop (prefill, then the KV cache), with a greedy sampler."""
    steps = generate_step(mx.array(ids), model, max_tokens=n, sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    return [int(token) for token, _ in steps]


@pytest.mark.parametrize("case", list(CASES))
def test_saved_model_runs_the_same_in_mlx(case, tmp_path, monkeypatch):
    model, bake_it = _abliterated(case, monkeypatch)
    tokenizer = build_tiny_tokenizer()
    probe = tokenizer(PROMPTS[0])["input_ids"]
    base_logits = _torch_logits(model, probe)
    bake_it()
    edited_logits = _torch_logits(model, probe)
    assert np.abs(edited_logits - base_logits).max() > 1e-2, "the ablation did not change the model"

    out = save_hf(model, tokenizer, tmp_path / "model")
    mlx_model, mlx_tokenizer = mlx_lm.load(str(out))  # strict: fails on any missing or unexpected weight

    # the edited weights, not the original ones, are what mlx runs
    np.testing.assert_allclose(_mlx_logits(mlx_model, probe), edited_logits, atol=ATOL, rtol=RTOL)

    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        # the saved tokenizer and chat template give mlx_lm the same prompt tokens
        mlx_text = mlx_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert mlx_text == text
        assert mlx_tokenizer.encode(mlx_text, add_special_tokens=False) == ids

        expected, margins = _torch_greedy(model, ids, NEW_TOKENS)
        got = _mlx_greedy(mlx_model, ids, NEW_TOKENS)
        assert len(got) == NEW_TOKENS
        for step, (token, want, margin) in enumerate(zip(got, expected, margins)):
            if token != want:  # allowed only where the top two logits tie within tolerance; the paths part there
                assert margin < TIE, f"{prompt!r}: mlx_lm chose {got}, transformers {expected} (step {step})"
                break

        # every position of prompt + continuation, teacher-forced: the full next-token distributions agree
        sequence = ids + expected
        np.testing.assert_allclose(_mlx_logits(mlx_model, sequence), _torch_logits(model, sequence),
                                   atol=ATOL, rtol=RTOL, err_msg=prompt)
