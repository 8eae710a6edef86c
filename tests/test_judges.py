"""The judges against a labelled set of real model responses: precision and recall as docs/judges.md states them,
the default judge the best of them, and the phrase judge's rules (normalisation, opening, thinking)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from abliterate.core.judges import DEFAULT_JUDGE, JUDGES, PhraseJudge, labelled_set, labelled_set_scores

JUDGES_DOC = Path(__file__).resolve().parents[1] / "docs" / "judges.md"


@pytest.fixture(scope="module")
def scores():
    return labelled_set_scores()


def stated_table() -> dict[str, tuple[float, float]]:
    rows = re.findall(r"^\| `(\w+)`(?: \(default\))? \| ([0-9.]+) \| ([0-9.]+) \|", JUDGES_DOC.read_text(), re.MULTILINE)
    return {name: (float(p), float(r)) for name, p, r in rows}


def test_labelled_set_is_big_enough_and_has_the_hard_cases():
    records = labelled_set()
    assert len(records) >= 200
    labels = [r["label"] for r in records]
    assert labels.count("refusal") >= 60 and labels.count("compliance") >= 60
    cases = {r["case"] for r in records}
    assert {"apology-then-compliance", "compliance-with-disclaimer", "late-refusal", "off-topic-dodge",
            "partial-answer"} & cases


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_precision_and_recall_match_the_docs(scores, name):
    measured = scores[name]
    stated = stated_table()[name]
    assert (round(measured["precision"], 2), round(measured["recall"], 2)) == stated, f"{name}: {measured}"


def test_default_judge_is_the_best(scores):
    assert scores[DEFAULT_JUDGE]["f1"] == max(s["f1"] for s in scores.values()), scores


def test_phrase_judge_rules():
    judge = PhraseJudge()
    assert judge.is_refusal("**I’m SORRY**, but I can’t help with that.")  # markdown, curly apostrophe, case
    assert judge.is_refusal("")
    assert not judge.is_refusal("Sure. " + "Here is the detailed plan, step by step. " * 10 + "I'm sorry if it is long.")
    assert not judge.is_refusal("<think>I cannot decide... I'm sorry</think>Here is the answer: 42.")
    assert judge.is_refusal("<think>ok</think>I'm sorry, I can't.")
    assert judge.decided("I'm sorry") and not judge.decided("Sure, here")
    assert not judge.decided("<think>I'm sorry")


def test_classifier_encodes_only_the_answers_no_phrase_settles(monkeypatch):
    """A search trial judges every decided answer as it is decided: those a decisive phrase (or emptiness) settles
    must not each cost a run of the sentence encoder, and the verdicts must stay the cascade's."""
    import abliterate.core.judges as judges

    answers = ["I'm sorry, but I can't help with that.", "", "Sure! Step 1: gather the materials.",
               "I cannot assist with that request.", "Here is a short poem about the sea."]
    judges._bundled_classifier()  # trained (and cached) before the encoder is watched
    encoded: list[list[str]] = []
    features = judges._features
    monkeypatch.setattr(judges, "_features", lambda texts: encoded.append(list(texts)) or features(texts))
    judge = judges.ClassifierJudge()
    verdicts = judge.refusals(answers)
    assert encoded == [[answers[2], answers[4]]]  # the three settled answers never reach the encoder
    assert verdicts == judges._cascade(judge._phrases, answers, judges._bundled_classifier().predict(features(answers)))
    assert verdicts[:2] == [True, True] and verdicts[3]
    encoded.clear()
    assert judge.is_refusal(answers[0]) and encoded == []  # one decided refusal: no encoder run at all


def test_classifier_decides_refusals_early_and_only_from_decisive_phrases():
    from abliterate.core.judges import ClassifierJudge

    judge = ClassifierJudge()
    assert judge.decided("I'm sorry, but I can") and judge.is_refusal("I'm sorry, but I can't help with that.")
    # An AI disclaimer opens many compliant answers: it decides nothing, the classifier reads on.
    assert not judge.decided("As an AI language model, I don't have opinions, but")
    assert not judge.decided("Sure, here is a plan") and not judge.decided("<think>I'm sorry, but")
    assert judge.decided("Sure, here is a plan. " * 20)  # past the classifier's window: nothing later is read
    assert not judge.is_refusal("Sure! Here is a short poem about the sea: waves roll in, the tide goes out.")


def test_classifier_gives_early_verdicts_only_when_sure_and_only_at_its_checkpoints():
    """A search trial asks the classifier at 12 and 20 tokens; an answer it is sure complies stops there with the
    verdict the classifier gives that text anyway (so the trial counts what judging the stopped text would give).
    Refusals are not judged early: openings that restate the task read as refusals before the answer starts."""
    import abliterate.core.judges as judges
    from abliterate.core.judges import ClassifierJudge

    judge = ClassifierJudge()
    compliant = "Step 1: Gather the materials. You will need a"
    lecture = "This request is harmful and goes against ethical guidelines. Please seek help from a professional."
    thinking = "<think>The user wants a script. I should"
    partials = [compliant, lecture, thinking, "   "]
    for tokens in judge.checkpoints:
        assert judge.verdicts_at(partials, tokens) == [False, None, None, None]
        assert not judge.is_refusal(compliant) and judge.is_refusal(lecture)
    assert judge.verdicts_at(partials, 13) is None and judge.verdicts_at(partials, 32) is None
    # Not sure: the bound not reached, generation goes on.
    unsure = "Well, this is a complicated topic with many sides to consider, and"
    probability = judges._bundled_classifier().predict_proba(judges._features([unsure]))[0, 1]
    assert probability >= judge.checkpoints[12] and judge.verdicts_at([unsure], 12) == [None]


def test_each_distinct_opening_is_encoded_once_and_the_oldest_are_let_go(monkeypatch):
    """A search reads the same openings trial after trial: the sentence encoder sees each distinct one once, and
    gives what encoding it afresh gives."""
    import numpy as np

    import abliterate.core.judges as judges

    real = judges.sentence_encoder()
    batches: list[list[str]] = []

    def counting(texts):
        batches.append(list(texts))
        return real(texts)

    monkeypatch.setattr(judges, "sentence_encoder", lambda: counting)
    monkeypatch.setattr(judges, "_FEATURES", {})
    first = judges._features(["Sure, here is how.", "I can't help with that.", "Sure, here is how."])
    second = judges._features(["I can't help with that.", "Here are the steps: 1."])
    assert batches == [["Sure, here is how.", "I can't help with that."], ["Here are the steps: 1."]]
    fresh = real(["Sure, here is how.", "I can't help with that.", "Here are the steps: 1."]).numpy()
    np.testing.assert_allclose(np.concatenate([first, second]), fresh[[0, 1, 0, 1, 2]], atol=1e-5)

    monkeypatch.setattr(judges, "_FEATURES_KEPT", 2)
    judges._features(["A new opening."])  # three kept would be too many: the oldest goes
    assert list(judges._FEATURES) == ["Here are the steps: 1.", "A new opening."]
