"""Static-shape decoding (the GPU path: fixed buffers, CUDA graphs) gives the tokens the dynamic path gives, on every
family whose cache it takes — with an edit hooked in, prefix reuse, left padding and rows finishing at different
steps — and what it cannot take (a sliding window shorter than prompt + answer; DeepSeek-V3's attention) falls back
to the dynamic path. On a CPU the steps run eagerly, so these tests
check everything but the capture itself, which the last test checks on a GPU (bench/gpu_decode.sh runs it)."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCH_CONFIGS, VISION_LANGUAGE
from test_prefix import PROMPTS, edits_from, setup

from abliterate.measure.engines import static_decode
from abliterate.measure.ablation import ablate
from abliterate.measure.evaluate import measure_refusals
from abliterate.measure.engines.transformers import _static_decoding, generate
from abliterate.core.judges import PhraseJudge
from abliterate.measure.engines.prefix import PrefixCache
from abliterate.measure.engines.transformers import TransformersEngine

SLIDING = dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"] * 2)


def finishes_on_a(text: str) -> bool:  # rows finish at different steps
    return "a" in text


# deepseek_v3's attention fails on the fixed buffers: the first step falls back to the dynamic path (same tokens)
@pytest.mark.parametrize("model_type", sorted(set(ARCH_CONFIGS) - VISION_LANGUAGE))
def test_static_decoding_gives_the_dynamic_tokens(model_type, monkeypatch):
    model, tokenizer, adapter, directions, batch_size = setup(model_type)
    decoders = []
    real_init = static_decode.StaticDecoder.__init__
    monkeypatch.setattr(static_decode.StaticDecoder, "__init__",
                        lambda self, *args, **kwargs: (decoders.append(self), real_init(self, *args, **kwargs))[1])
    with ablate(*edits_from(adapter, directions, 1)):
        dynamic = generate(model, tokenizer, PROMPTS, 10, batch_size, finishes_on_a, decode="dynamic")
        static = generate(model, tokenizer, PROMPTS, 10, batch_size, finishes_on_a, decode="static")
        reused = generate(model, tokenizer, PROMPTS, 10, batch_size, finishes_on_a, 1, PrefixCache(), decode="static")
        whole = 4 if batch_size > 1 else 1  # all prompts in one batch: the longest padding
        full = generate(model, tokenizer, PROMPTS, 10, whole, decode="static")
        full_dynamic = generate(model, tokenizer, PROMPTS, 10, whole, decode="dynamic")
    # the fixed buffers really ran (sliding windows longer than prompt + answer included)
    assert decoders and (model in static_decode._UNSUPPORTED) == (model_type == "deepseek_v3")
    assert static.tokens == dynamic.tokens
    assert reused.tokens == dynamic.tokens
    assert full.tokens == full_dynamic.tokens
    assert any(len(t) == 10 for t in full.tokens)  # really decoded, not stopped at once
    # a fixed batch computes its finished rows too: counted, so tokens_saved stays honest
    assert static.tokens_generated >= dynamic.tokens_generated


def test_the_decoder_takes_full_attention_and_windows_longer_than_the_answer():
    model, tokenizer, *_ = setup("llama")
    sliding, sliding_tokenizer, *_ = setup("gemma3_text", **SLIDING)  # window 5: shorter than the prompts
    inputs = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True, add_special_tokens=False)
    cache = model(**inputs, use_cache=True).past_key_values
    sliding_cache = sliding(**inputs, use_cache=True).past_key_values
    assert static_decode.supports(model, cache, 40)
    assert not static_decode.supports(sliding, sliding_cache, 40)
    # a window that tokens would slide out of decodes dynamically, to the same tokens
    assert (generate(sliding, sliding_tokenizer, PROMPTS, 8, 2, finishes_on_a, decode="static").tokens
            == generate(sliding, sliding_tokenizer, PROMPTS, 8, 2, finishes_on_a, decode="dynamic").tokens)


def test_refusal_counting_stops_early_on_the_static_path_too():
    model, tokenizer, *_ = setup("llama")
    judge = PhraseJudge(markers=("q",), opening_chars=1000)  # one of the four answers
    dynamic = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 12, 4, decode="dynamic")
    static = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 12, 4, decode="static")
    assert static.verdicts == dynamic.verdicts and static.responses == dynamic.responses
    assert static.refusals > 0
    stopped = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 12, 4, stop_at_refusals=1, decode="static")
    assert stopped.stopped_at == 1


def test_out_of_memory_on_the_fixed_buffers_halves_the_batch_instead_of_leaving_the_path(monkeypatch):
    model, tokenizer, *_ = setup("llama")
    real_step = static_decode.StaticDecoder._step

    def step_fitting_two(decoder):
        if decoder.ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(decoder)

    monkeypatch.setattr(static_decode.StaticDecoder, "_step", step_fitting_two)
    judge = PhraseJudge(markers=("q",), opening_chars=1000)
    backed_off = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 8, 4, decode="static")
    assert model not in static_decode._UNSUPPORTED
    assert backed_off.responses == measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 8, 2, decode="dynamic").responses


def test_auto_is_static_only_on_a_single_gpu_when_asked(monkeypatch):
    model, *_ = setup("llama")
    monkeypatch.setenv("ABLITERATE_CUDA_GRAPHS", "1")
    assert not _static_decoding(model, "auto")  # a CPU: finished rows leave the batch instead
    assert _static_decoding(model, "static") and not _static_decoding(model, "dynamic")
    with pytest.raises(ValueError):
        _static_decoding(model, "graphs")
    monkeypatch.setattr("abliterate.measure.engines.transformers.device_of", lambda _: torch.device("cuda", 0))
    assert _static_decoding(model, "auto")
    monkeypatch.setattr(model, "hf_device_map", {"model.layers.0": 0, "model.layers.1": 1}, raising=False)
    assert not _static_decoding(model, "auto")  # split over two GPUs
    monkeypatch.delattr(model, "hf_device_map")
    monkeypatch.delenv("ABLITERATE_CUDA_GRAPHS")
    assert not _static_decoding(model, "auto")  # opt-in until measured on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run by bench/gpu_decode.sh)")
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "olmo2", "gpt2", "gemma3_text"])
def test_on_a_gpu_the_steps_are_captured_and_replayed_to_the_same_tokens(model_type):
    model, tokenizer, adapter, directions, batch_size = setup(model_type)
    model = model.cuda()
    directions = directions.cuda()
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = lambda graph: (replays.append(1), real_replay(graph))[1]
    try:
        for first_layer in (1, 2):  # two trials: each call captures its own edit
            with ablate(*edits_from(adapter, directions, first_layer)):
                dynamic = generate(model, tokenizer, PROMPTS, 10, 4, decode="dynamic")
                replays.clear()
                static = generate(model, tokenizer, PROMPTS, 10, 4, decode="static")
                assert replays, "no graph was replayed"
                assert model not in static_decode._UNCAPTURABLE
                assert static.tokens == dynamic.tokens
    finally:
        torch.cuda.CUDAGraph.replay = real_replay
