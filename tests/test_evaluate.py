"""Evaluation: our cached greedy decoding equals transformers' generate; early decision changes no verdict;
KL is zero against itself and positive after an edit; multi-token KL is teacher-forced correctly."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from abliterate.measure.ablation import AblationParams, ablate, plan_edits
from abliterate.core.arch import adapter_for
from abliterate.measure.evaluate import Baseline, measure_refusals
from abliterate.measure.engines.transformers import generate, next_token_logprobs
from abliterate.core.judges import PhraseJudge
from abliterate.measure.engines.transformers import TransformersEngine

PROMPTS = ["<|user|>Say hi<|end|><|assistant|>", "<|user|>Tell me a longer story please<|end|><|assistant|>",
           "<|user|>x<|end|><|assistant|>", "<|user|>What is two plus two?<|end|><|assistant|>"]


@pytest.fixture(scope="module", params=["llama", "gemma3_text", "qwen3_moe", "gpt2"])
def model_and_tokenizer(request):
    return build_tiny_model(request.param), build_tiny_tokenizer()


def hf_greedy(model, tokenizer, prompts, max_new_tokens):
    texts = []
    for prompt in prompts:  # one at a time: no padding at all, the reference
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def test_batched_cached_greedy_equals_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ours = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3)
    assert ours.texts == hf_greedy(model, tokenizer, PROMPTS, 12)
    assert ours.tokens_generated <= ours.tokens_budget == 12 * len(PROMPTS)


def test_early_decision_keeps_every_verdict_and_saves_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    # A judge whose "refusal phrase" is any letter 'a' in the opening: decided early for most rows.
    judge = PhraseJudge(markers=("a",), opening_chars=8)
    early = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=48, batch_size=4, early_stop=True)
    full = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=48, batch_size=4, early_stop=False)
    assert early.verdicts == full.verdicts
    assert early.tokens_saved > 0 and full.tokens_saved >= 0
    for short, long in zip(early.responses, full.responses):
        assert long.startswith(short)


def test_generation_stops_at_the_refusal_count_that_makes_a_trial_dominated(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    judge = PhraseJudge(markers=("",), opening_chars=8)  # every non-empty opening is a decided refusal
    full = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=16, batch_size=2)
    assert full.refusals >= 2 and full.stopped_at is None
    stopped = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=16, batch_size=2, stop_at_refusals=2)
    assert stopped.stopped_at == stopped.refusals == 2 and stopped.responses == []
    # A bound it never reaches changes nothing.
    unreached = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=16, batch_size=2,
                                 stop_at_refusals=len(PROMPTS) + 1)
    assert (unreached.verdicts, unreached.responses, unreached.stopped_at) == (full.verdicts, full.responses, None)


def test_a_bounded_trial_judges_open_answers_together_at_the_end(model_and_tokenizer, monkeypatch):
    """With a refusal bound, answers are counted as they are decided; the classifier's encoder must not run once per
    decided answer inside the decode loop (only phrase-settled refusals count there), and verdicts stay the same."""
    import abliterate.core.judges as judges

    model, tokenizer = model_and_tokenizer
    judges._bundled_classifier()  # trained before the encoder is watched
    batches: list[int] = []
    features = judges._features
    monkeypatch.setattr(judges, "_features", lambda texts: batches.append(len(texts)) or features(texts))
    judge = judges.ClassifierJudge(opening_chars=4)  # random bytes fill the window: decided, never phrase-settled
    bounded = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=40, batch_size=4,
                               stop_at_refusals=len(PROMPTS) + 1)
    assert bounded.stopped_at is None and bounded.tokens_saved > 0
    assert len(batches) == 1  # one encoder batch (the answers no phrase settles), after generation
    batches.clear()
    assert bounded.verdicts == measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, max_new_tokens=40, batch_size=4).verdicts


def test_kl_zero_against_itself_and_positive_after_an_edit():
    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    baseline = Baseline.measure(TransformersEngine(model, tokenizer), PROMPTS, kl_tokens=6, top_k=320, batch_size=2)
    assert baseline.kl(TransformersEngine(model, tokenizer)) == pytest.approx(0.0, abs=1e-6)
    assert baseline.kl_multi_token(TransformersEngine(model, tokenizer), batch_size=3) == pytest.approx(0.0, abs=1e-5)
    adapter = adapter_for(model)
    directions = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    with ablate(plan_edits(adapter, directions, AblationParams.single_direction(2, 1.0))):
        kl = baseline.kl(TransformersEngine(model, tokenizer))
        multi = baseline.kl_multi_token(TransformersEngine(model, tokenizer))
        # Reference for the multi-token value: run each prompt+continuation alone, full vocabulary.
        reference = []
        for prompt, cont, top_logprobs in zip(PROMPTS, baseline.continuations, baseline.top_logprobs):
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids + cont[:-1]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -len(cont):].float(), -1)
            base = top_logprobs[: len(cont)]  # top_k = vocab: the full distribution, sorted
            ids_sorted = baseline.top_ids[PROMPTS.index(prompt), : len(cont)]
            reference.extend((base.exp() * (base - logprobs.gather(-1, ids_sorted))).sum(-1).tolist())
    assert kl > 1e-4 and multi > 1e-4
    assert multi == pytest.approx(sum(reference) / len(reference), rel=1e-3, abs=1e-6)


def test_first_token_logprobs_do_not_depend_on_batching():
    model, tokenizer = build_tiny_model("qwen2"), build_tiny_tokenizer()
    torch.testing.assert_close(next_token_logprobs(model, tokenizer, PROMPTS, 1),
                               next_token_logprobs(model, tokenizer, PROMPTS, 4), atol=1e-5, rtol=1e-5)


def test_perplexity_matches_the_models_own_loss():
    from abliterate.measure.evaluate import perplexity

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 3
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert perplexity(model, tokenizer, text, window=1000) == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    # Windows do not overlap: the value changes only slightly when split.
    assert perplexity(model, tokenizer, text, window=40) == pytest.approx(float(torch.exp(loss)), rel=0.2)


def test_batch_size_is_the_fastest_that_fits_and_backs_off_on_out_of_memory(monkeypatch):
    from abliterate.measure.engines import transformers as engine
    from abliterate.measure import evaluate as evaluation

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    prompts = PROMPTS * 8  # 32 prompts
    chosen = engine.choose_batch_size(model, tokenizer, prompts, max_batch_size=16)
    assert chosen in (1, 2, 4, 8, 16)

    real_generate = engine.generate

    def generate_fitting_four(model, tokenizer, formatted_prompts, max_new_tokens=32, batch_size=16, decided=None,
                              **options):
        if min(batch_size, len(formatted_prompts)) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(model, tokenizer, formatted_prompts, max_new_tokens, batch_size, decided, **options)

    monkeypatch.setattr(engine, "generate", generate_fitting_four)
    assert engine.choose_batch_size(model, tokenizer, prompts, max_batch_size=64) <= 4
    # measure_refusals asked for 32 at once halves until it fits, with the same result as batches of 4
    judge = PhraseJudge()
    backed_off = evaluation.measure_refusals(TransformersEngine(model, tokenizer), prompts, judge, 6, batch_size=32)
    direct = evaluation.measure_refusals(TransformersEngine(model, tokenizer), prompts, judge, 6, batch_size=4)
    assert backed_off.responses == direct.responses


def test_loaded_models_give_their_lm_head_a_contiguous_input_with_the_same_logits(tiny_model_dir):
    """`logits_to_keep=1` slices the last hidden state; a strided slice sends torch's matmul down a path that copies
    the whole head weight per prompt (10x slower KL passes on CPU). load_model makes the head's input contiguous."""
    from abliterate.core.load import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32")
    seen = []
    handle = loaded.model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous()))
    try:
        fixed = next_token_logprobs(loaded.model, loaded.tokenizer, PROMPTS, 4)
    finally:
        handle.remove()
    assert seen and all(seen)
    plain = build_tiny_model("llama")  # the same weights (same seed), no hook: its head sees the strided slice
    torch.testing.assert_close(fixed, next_token_logprobs(plain, loaded.tokenizer, PROMPTS, 4), atol=1e-5, rtol=1e-5)


def test_early_verdicts_stop_the_rows_they_judge_where_they_judge_them(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    full = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3)
    target = tokenizer.decode(full.tokens[0][:3], skip_special_tokens=True)
    asked: list[int] = []

    def verdicts_at(texts, tokens):  # at 3 tokens: judge the rows that read like prompt 0's, the rest read on
        asked.append(tokens)
        return [True if text == target else None for text in texts] if tokens == 3 else None

    early = generate(model, tokenizer, PROMPTS, max_new_tokens=10, batch_size=3, verdicts_at=verdicts_at)
    assert 3 in asked and len(full.tokens[0]) > 3
    for long, short in zip(full.tokens, early.tokens):
        stopped = len(long) > 3 and tokenizer.decode(long[:3], skip_special_tokens=True) == target
        assert short == (long[:3] if stopped else long)
    assert early.tokens_generated < full.tokens_generated
    assert generate(model, tokenizer, PROMPTS, 10, 3, verdicts_at=lambda texts, tokens: None).tokens == full.tokens


def test_early_refusal_verdicts_count_toward_the_bound_that_ends_a_dominated_trial(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    class RefusesAtThree(PhraseJudge):
        def verdicts_at(self, partials, tokens):
            return [True] * len(partials) if tokens == 3 else None

    judge = RefusesAtThree(markers=("\x00",), opening_chars=1000)
    stopped = measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 10, batch_size=4, stop_at_refusals=2,
                               early_verdicts=True)
    assert stopped.stopped_at == 2 and stopped.responses == []
    # Without early verdicts nothing is decided before the budget: the bound is never met during generation.
    assert measure_refusals(TransformersEngine(model, tokenizer), PROMPTS, judge, 10, batch_size=4, stop_at_refusals=2).stopped_at is None


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3_moe", "gemma3_text", "deepseek_v3"])
def test_the_prompts_shared_head_is_computed_once_and_changes_nothing(model_type, monkeypatch):
    """Prompts that open alike (chat header, system prompt) start from one row's cache of that head: the layers
    compute fewer tokens, the log-probs and the greedy tokens stay those of whole prompts. Models whose cache
    cannot be continued that way (DeepSeek-V3's multi-token continuation fails in transformers) compute whole
    prompts, as before."""
    import abliterate.measure.engines.transformers as evaluation

    model, tokenizer = build_tiny_model(model_type), build_tiny_tokenizer()
    prompts = ["<|system|>Be brief.<|end|>" + p for p in PROMPTS]
    batch_size = 1 if model_type == "deepseek_v3" else 3  # transformers' deepseek_v3 fails on padded batches
    rows_through_layer_0: list[int] = []
    layer = adapter_for(model).layers[0]
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: rows_through_layer_0.append((args[0] if args else kwargs["hidden_states"])
                                                                 .shape[:2].numel()), with_kwargs=True)
    try:
        shared = next_token_logprobs(model, tokenizer, prompts, batch_size)
        shared_tokens = generate(model, tokenizer, prompts, 6, batch_size, decided=lambda text: "a" in text).tokens
        shared_rows, rows_through_layer_0[:] = sum(rows_through_layer_0), []
        monkeypatch.setattr(evaluation, "SHARE_HEAD", False)
        whole = next_token_logprobs(model, tokenizer, prompts, batch_size)
        whole_tokens = generate(model, tokenizer, prompts, 6, batch_size, decided=lambda text: "a" in text).tokens
        whole_rows = sum(rows_through_layer_0)
    finally:
        handle.remove()
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert shared_tokens == whole_tokens
    shares = evaluation._HEAD_WORKS[model]
    assert shares == (model_type in ("llama", "gpt2", "qwen3_moe"))  # gemma3: sliding-window layers
    assert (shared_rows < whole_rows) == shares  # the head check's few rows included


def test_a_trials_two_passes_compute_their_common_head_once():
    """A search trial's KL pass and its generation open with the same chat header: with one `heads` memo for the
    trial's model, the header's one-row pass runs once, not once per pass, and changes nothing."""
    import abliterate.measure.engines.transformers as evaluation

    model, tokenizer = build_tiny_model("llama"), build_tiny_tokenizer()
    benign = ["<|system|>Be brief.<|end|>" + p for p in PROMPTS]
    harmful = [f"<|system|>Be brief.<|end|><|user|>{verb} harm, {i}<|end|><|assistant|>"
               for i, verb in enumerate(["Do", "Cause", "Plan", "Make", "Wish"])]  # the same head as `benign`
    separate = (next_token_logprobs(model, tokenizer, benign, 3),
                generate(model, tokenizer, harmful, 6, 3, decided=lambda text: "a" in text).tokens)
    head = evaluation._head_length(tokenizer, tuple(benign))
    assert head == evaluation._head_length(tokenizer, tuple(harmful)) > 0
    header_passes: list[bool] = []  # one row, the header's length: the header's own pass
    handle = adapter_for(model).layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: header_passes.append(
            tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]) == (1, head)), with_kwargs=True)
    heads: dict = {}
    try:
        shared = (next_token_logprobs(model, tokenizer, benign, 3, heads=heads),
                  generate(model, tokenizer, harmful, 6, 3, decided=lambda text: "a" in text, heads=heads).tokens)
    finally:
        handle.remove()
    assert len(heads) == 1 and sum(header_passes) == 1
    torch.testing.assert_close(shared[0], separate[0], atol=0, rtol=0)
    assert shared[1] == separate[1]
