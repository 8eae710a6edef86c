"""Prefix reuse: a trial started from the base model's stored states at its first edited layer gives exactly what
the full forward gives — first-token log-probs and generated tokens — on every family, within any memory budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ARCH_CONFIGS, VISION_LANGUAGE, build_tiny_model, build_tiny_tokenizer

from abliterate.measure.engines import transformers as evaluate
from abliterate.measure.engines import prefix as prefix_module
from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, ablate, plan_edits
from abliterate.core.arch import adapter_for
from abliterate.measure.evaluate import Baseline, measure_refusals
from abliterate.measure.engines.transformers import generate, next_token_logprobs
from abliterate.core.judges import PhraseJudge
from abliterate.measure.engines.prefix import PrefixCache, plan_stops
from abliterate.measure.engines.transformers import TransformersEngine

PROMPTS = ["<|user|>Say hi<|end|><|assistant|>", "<|user|>Tell me a longer story please<|end|><|assistant|>",
           "<|user|>x<|end|><|assistant|>", "<|user|>What is two plus two?<|end|><|assistant|>"]
SLIDING = dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2)  # windows shorter than prompts
CASES = [(t, {}) for t in ARCH_CONFIGS] + [("gemma3_text", SLIDING), ("gpt_oss", SLIDING)]


def decided(text: str) -> bool:  # rows finish at different steps: exercises the cache's row selection
    return "a" in text


def edits_from(adapter, directions, first_layer: int, norm_preserving: bool = False):
    """Edits on layers first_layer..n-1 (a kernel peaking at the last layer); layers below are left alone."""
    last = adapter.n_layers - 1
    kernel = Kernel(1.2, last, 0.6, last - first_layer + 0.5)
    params = AblationParams({kind: ComponentParams(last / 2, kernel) for kind in ("attn", "mlp")}, norm_preserving)
    edits = plan_edits(adapter, directions, params)
    assert min(edit.component.layer for edit in edits) == first_layer
    return edits, norm_preserving


def setup(model_type: str, **overrides):
    model = build_tiny_model(model_type, **({} if model_type in VISION_LANGUAGE else overrides))
    adapter = adapter_for(model)
    directions = torch.nn.functional.normalize(
        torch.randn(adapter.n_layers, adapter.hidden_size, generator=torch.Generator().manual_seed(1)), dim=-1)
    batch_size = 1 if model_type == "deepseek_v3" else 2  # transformers' deepseek_v3 fails on padded batches
    return model, build_tiny_tokenizer(), adapter, directions, batch_size


def check_trials(model, tokenizer, adapter, directions, batch_size, kl_prefix, gen_prefix, trials):
    """Each trial: full forward vs prefix reuse, same numbers. Returns how often the real layer 0 ran over the prompt
    batches in the last reuse pass (the shared head's one-row pass, `_head_cache`, runs every layer once per pass)."""
    runs = []

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        runs.append(hidden.shape[0] > 1 or hidden.shape[1] > evaluate._head_length(tokenizer, tuple(PROMPTS)))

    counter = adapter.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        for first_layer, norm_preserving in trials:
            with ablate(*edits_from(adapter, directions, first_layer, norm_preserving)):
                full = next_token_logprobs(model, tokenizer, PROMPTS, batch_size)
                full_tokens = generate(model, tokenizer, PROMPTS, 8, batch_size, decided).tokens
                runs.clear()
                reused = next_token_logprobs(model, tokenizer, PROMPTS, batch_size, first_layer, kl_prefix)
                kl_layer0_runs = sum(runs)
                reused_tokens = generate(model, tokenizer, PROMPTS, 8, batch_size, decided, first_layer, gen_prefix).tokens
            torch.testing.assert_close(reused, full, atol=1e-5, rtol=0)
            assert reused_tokens == full_tokens
    finally:
        counter.remove()
    return kl_layer0_runs


@pytest.mark.parametrize("model_type,overrides", CASES, ids=[t + ("-sliding" if o else "") for t, o in CASES])
def test_prefix_reuse_equals_the_full_forward(model_type, overrides):
    model, tokenizer, adapter, directions, batch_size = setup(model_type, **overrides)
    assert adapter.family.prefix_reuse
    kl_prefix, gen_prefix = PrefixCache(1 << 30), PrefixCache(1 << 30)
    # first use plans, the next trials fill the cache (only below their first edited layer), the last ones reuse it
    last_runs = check_trials(model, tokenizer, adapter, directions, batch_size, kl_prefix, gen_prefix,
                             [(2, False), (1, False), (3, True), (2, True), (3, False)])
    assert kl_prefix.stops == gen_prefix.stops == [1, 2, 3]
    assert last_runs == 0  # the last KL pass started at layer 3: layer 0 never ran
    assert gen_prefix.kv and all(layer < 3 for _, layer in gen_prefix.kv)


def test_a_family_without_reuse_falls_back(monkeypatch):
    def no_reuse(model):
        adapter = adapter_for(model)
        adapter.family = dataclasses.replace(adapter.family, prefix_reuse=False)
        return adapter

    monkeypatch.setattr(prefix_module, "adapter_for", no_reuse)
    model, tokenizer, adapter, directions, batch_size = setup("llama")
    kl_prefix, gen_prefix = PrefixCache(1 << 30), PrefixCache(1 << 30)
    runs = check_trials(model, tokenizer, adapter, directions, batch_size, kl_prefix, gen_prefix, [(2, False)] * 3)
    assert runs == len(PROMPTS) // batch_size  # every pass ran in full
    assert kl_prefix.stops is None and not kl_prefix.hidden and not gen_prefix.kv


def test_plan_fits_the_budget_and_skips_the_most_layers():
    assert plan_stops(12, 1, 0, 100) == list(range(1, 12))
    assert plan_stops(12, 1, 0, 3) == [3, 6, 9]  # three stops: spread out
    assert plan_stops(12, 1, 1, 6) == [2, 4]  # each stop also needs the KV below it
    assert plan_stops(12, 1, 0, 0.5) == []


@pytest.mark.parametrize("budget_layers", [0, 1, 2.5])
def test_a_small_budget_keeps_fewer_layers_and_the_same_numbers(budget_layers):
    model, tokenizer, adapter, directions, batch_size = setup("qwen2", num_hidden_layers=6)
    tokens = sum(tokenizer(PROMPTS[i:i + batch_size], padding=True, return_tensors="pt").input_ids.numel()
                 for i in range(0, len(PROMPTS), batch_size))  # padded, as the batches run
    budget = int(budget_layers * tokens * adapter.hidden_size * 4)  # float32: room for this many stops
    kl_prefix, gen_prefix = PrefixCache(budget), PrefixCache(budget)
    check_trials(model, tokenizer, adapter, directions, batch_size, kl_prefix, gen_prefix,
                 [(4, False), (5, False), (3, False), (5, False)])
    assert len(kl_prefix.stops) == int(budget_layers)
    assert kl_prefix.used <= budget and gen_prefix.used <= budget


def test_baseline_and_refusals_take_the_first_edited_layer():
    model, tokenizer, adapter, directions, batch_size = setup("llama")
    engine = TransformersEngine(model, tokenizer)
    baseline = Baseline.measure(engine, PROMPTS, kl_tokens=0, batch_size=batch_size)
    harmful_prefix, judge = PrefixCache(1 << 30), PhraseJudge(markers=("a",), opening_chars=8)
    for _ in range(3):
        with ablate(*edits_from(adapter, directions, 2)):
            assert baseline.kl(engine, batch_size, 2) == pytest.approx(baseline.kl(engine, batch_size), abs=1e-6)
            full = measure_refusals(engine, PROMPTS, judge, 8, batch_size)
            reused = measure_refusals(engine, PROMPTS, judge, 8, batch_size, first_edited_layer=2, prefix=harmful_prefix)
        assert (reused.responses, reused.verdicts) == (full.responses, full.verdicts)
    assert baseline.prefix.hidden and harmful_prefix.kv
    other = TransformersEngine(build_tiny_model("llama", seed=1), tokenizer)  # its states are not the cached ones
    assert baseline.kl(other, batch_size, 2) == pytest.approx(baseline.kl(other, batch_size))
