"""Search: multi-objective optimisation (Optuna TPE) of the ablation, minimising (refusals, KL) on the tune split.

A new study starts from single-direction ablations (`space.warm_start`: Arditi et al.'s, and two stronger ones),
then samples at random (`startup_trials`), then lets TPE choose -- focused (`focus`) on trials that remove at
least half the base model's refusals, the part of the front users pick from. One trial: sample parameters →
apply them in memory (hooks, no reload) → first-token KL on the benign tune prompts (one forward pass) → if the
trial cannot reach the Pareto front, stop here → otherwise generate the harmful tune prompts with early decision
and count refusals (`TrialContext.tune_harmful`: by default only those the base model refuses, see
`run.search_prompts`; with `early_verdicts` the classifier judges an answer it is sure complies at 12 or 20
tokens, see judges.py). Gibberish answers count as refusals: a degenerate answer helps nobody, so the search treats it as
damage, not success.

A trial is cut short (no generation) when its KL exceeds `max_kl`, or when a finished trial already has
0 refusals at a KL no higher than this one's: then this trial is dominated whatever its refusals; it is
recorded with the pessimistic value refusals = total, so the sampler still learns the region is bad. Once a
finished trial with R refusals has a KL no higher than this one's, generation stops at this trial's R-th
decided refusal (dominated again), recorded with the R refusals it reached. Cut-short trials never enter
the Pareto front.
"""

from __future__ import annotations

import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import optuna
from optuna.storages.journal import JournalFileBackend

from abliterate.measure.ablation import AblationParams, ComponentParams, Kernel, plan_edits
from abliterate.core.settings import SearchSpace
from abliterate.core.rundir import STUDY_NAME
from abliterate.errors import UserError
from abliterate.measure.evaluate import measure_refusals
from abliterate.search.pick import auto_choice
from abliterate.measure.engines.prefix import PrefixCache

# (band, KL below, refusal rate below): reference 001's quality bands.
QUALITY_BANDS = (("Excellent", 0.15, 0.01), ("Very good", 0.25, 0.025), ("Good", 0.40, 0.05))


def quality_band(refusal_rate: float, kl: float) -> str:
    for band, kl_limit, rate_limit in QUALITY_BANDS:
        if kl < kl_limit and refusal_rate < rate_limit:
            return band
    return "Poor"


def advice(refusal_rate: float, kl: float, degenerate: int) -> list[str]:
    tips = []
    if refusal_rate > 0.05:
        tips.append("refusals above 5%: run more trials (the same command resumes)")
    if kl > 0.40:
        tips.append("KL above 0.40: lower space.max_weight or use direction_scope = [\"global\"]")
    if degenerate:
        tips.append("gibberish answers: keep space.max_weight at or below 1.5")
    return tips


def _distance_range(space: SearchSpace, n_layers: int) -> tuple[float, float]:
    """min_weight_distance in layers (at least half a layer, so a kernel always reaches its peak's layer)."""
    return max(space.min_weight_distance[0] * n_layers, 0.5), max(space.min_weight_distance[1] * n_layers, 0.5)


def suggest_params(trial: optuna.Trial, space: SearchSpace, n_layers: int) -> AblationParams:
    """Sample one parameter set; positions are sampled in layers, from fractions of depth in `space`."""
    last = n_layers - 1
    scope = trial.suggest_categorical("direction_scope", space.direction_scope)
    index = (trial.suggest_float("direction_index", space.direction_index[0] * last, space.direction_index[1] * last)
             if scope == "global" else None)
    norm_preserving = trial.suggest_categorical("norm_preserving", space.norm_preserving)
    components = {}
    for kind in space.components:
        max_weight = trial.suggest_float(f"{kind}.max_weight", *space.max_weight)
        position = trial.suggest_float(f"{kind}.max_weight_position", space.max_weight_position[0] * last,
                                       space.max_weight_position[1] * last)
        min_fraction = trial.suggest_float(f"{kind}.min_weight", *space.min_weight)
        distance = trial.suggest_float(f"{kind}.min_weight_distance", *_distance_range(space, n_layers))
        components[kind] = ComponentParams(index, Kernel(max_weight, position, min_fraction * max_weight, distance))
    return AblationParams(components, norm_preserving)


def warm_start_params(space: SearchSpace, n_layers: int) -> list[dict]:
    """Optuna parameters of `space.warm_start`'s trials: one direction at each entry's depth, removed at the entry's
    weights, flat, from every layer between the space's lowest peak position and the last layer (a kernel peaked at
    the last layer that reaches down that far), plain projection. Values the space's ranges exclude are clipped
    into them."""
    if "global" not in space.direction_scope:
        return []
    last = n_layers - 1

    def clip(value: float, low: float, high: float) -> float:
        return min(max(value, low), high)

    position = space.max_weight_position[1] * last
    reach = clip(position - space.max_weight_position[0] * last, *_distance_range(space, n_layers))
    trials = []
    for start in space.warm_start:
        params = {"direction_scope": "global", "direction_index": clip(start.depth, *space.direction_index) * last,
                  "norm_preserving": False if False in space.norm_preserving else space.norm_preserving[0]}
        for kind in space.components:
            params |= {f"{kind}.max_weight": clip(getattr(start, kind), *space.max_weight),
                       f"{kind}.max_weight_position": position,
                       f"{kind}.min_weight": clip(1.0, *space.min_weight),
                       f"{kind}.min_weight_distance": reach}
        trials.append(params)
    return trials


@dataclass
class TrialContext:
    """What every trial measures against: computed once per run."""

    loaded: object
    engine: object  # abliterate.plugins.Engine running loaded's model
    directions: object  # [n_layers, hidden] tensor
    tune_harmful: list[str]  # formatted: the harmful tune prompts every trial answers
    baseline: object  # evaluate.Baseline on the benign tune prompts
    judge: object
    max_new_tokens: int
    batch_size: int
    max_kl: float
    harmful_prefix: PrefixCache = field(default_factory=PrefixCache)  # base states of the harmful prompts' prefills
    refusal_ceiling: float | None = None  # `focus`: trials keeping more refusals are infeasible to the sampler
    early_verdicts: bool = False  # judge confident answers at the judge's checkpoints (see judges.py)


def _refusal_bound(study: optuna.Study, kl: float) -> int | None:
    """The fewest refusals of a trial measured in full at a KL no higher than `kl`: a trial with `kl` that reaches
    this many refusals is dominated whatever its other answers say (None: no such trial yet)."""
    counts = [done.values[0] for done in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
              if done.values[1] <= kl and not done.user_attrs.get("cut_short")]
    return int(min(counts)) if counts else None


def objective(context: TrialContext, space: SearchSpace):
    loaded = context.loaded
    total = len(context.tune_harmful)

    def run_trial(trial: optuna.Trial) -> tuple[float, float]:
        values = measure_trial(trial)
        focus(trial, values[0], context.refusal_ceiling)
        return values

    def measure_trial(trial: optuna.Trial) -> tuple[float, float]:
        params = suggest_params(trial, space, loaded.adapter.n_layers)
        trial.set_user_attr("params", params.to_dict())
        edits = plan_edits(loaded.adapter, context.directions, params)
        # layers below the first edited one compute what the base model does: reuse it, don't recompute it
        first_edited = min((edit.component.layer for edit in edits), default=loaded.adapter.n_layers)
        heads = {}  # the chat header's cache, computed by this trial's model once for both passes
        with context.engine.ablated(edits, params.norm_preserving):
            started = time.perf_counter()
            kl = context.baseline.kl(context.engine, context.batch_size, first_edited, heads)
            trial.set_user_attr("kl_seconds", round(time.perf_counter() - started, 3))  # where a trial's time goes
            bound = _refusal_bound(trial.study, kl) if math.isfinite(kl) else None
            if not math.isfinite(kl) or kl > context.max_kl or bound == 0:
                trial.set_user_attr("cut_short", True)
                return float(total), kl if math.isfinite(kl) else 1e6
            started = time.perf_counter()
            result = measure_refusals(context.engine, context.tune_harmful, context.judge,
                                      context.max_new_tokens, context.batch_size,
                                      first_edited_layer=first_edited, prefix=context.harmful_prefix,
                                      stop_at_refusals=bound, early_verdicts=context.early_verdicts, heads=heads)
            trial.set_user_attr("generation_seconds", round(time.perf_counter() - started, 3))
        if result.stopped_at is not None:  # dominated part-way: recorded with the refusals it had reached
            trial.set_user_attr("cut_short", True)
            trial.set_user_attr("refusals_at_least", result.stopped_at)
            return float(result.stopped_at), kl
        degenerate_answers = sum(is_gib and not refused for is_gib, refused in
                                 zip(map(context.judge.is_degenerate, result.responses), result.verdicts))
        trial.set_user_attr("refusals", result.refusals)
        trial.set_user_attr("degenerate", degenerate_answers)
        trial.set_user_attr("tokens_saved", result.tokens_saved)
        return float(result.refusals + degenerate_answers), kl

    return run_trial


@contextmanager
def _ctrl_c_deferred():
    """Ctrl-C during the block takes effect when the block is done. Optuna's journal write holds a lock file;
    interrupted inside it, the lock is left behind or its release fails with an OSError that hides the Ctrl-C
    (seen: a traceback and exit 1 instead of `run`'s clean stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; other threads never receive SIGINT
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
        elif pending and previous in (signal.SIG_DFL, None):
            raise KeyboardInterrupt


class JournalBackend(JournalFileBackend):
    """Optuna's append-only journal file, with each write (and its lock) atomic with respect to Ctrl-C."""

    def append_logs(self, logs: list[dict]) -> None:
        with _ctrl_c_deferred():
            super().append_logs(logs)


def focus(trial: optuna.Trial, counted_refusals: float, refusal_ceiling: float | None) -> None:
    """Mark a trial that keeps more than `refusal_ceiling` refusals infeasible (an Optuna constraint > 0). Why: TPE
    models its "good" trials on the best few by Pareto rank and hypervolume, which rewards spread along the whole
    front -- including its near-zero-KL end, where an ablation barely changes the model and most refusals stay.
    Nobody picks from there; marking it infeasible makes the sampler refine the end users choose from. Such
    trials are still recorded, on the front and pickable."""
    if refusal_ceiling is not None:
        trial.set_constraint("refusals", counted_refusals - refusal_ceiling)


def open_study(storage_path: str, seed: int, startup_trials: int, warm_start: list[dict] = ()) -> optuna.Study:
    """Create or continue the study persisted in an append-only journal (a kill -9 loses at most one trial).
    A new study first runs the `warm_start` parameter sets (queued in the journal, so a resume keeps them)."""
    from optuna.storages import JournalStorage

    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True, group=True)
    storage = JournalStorage(JournalBackend(storage_path))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        for params in warm_start:
            study.enqueue_trial(params)
    return study


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def pareto_front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Non-dominated finished trials that were measured in full, by refusals then KL."""
    candidates = [t for t in finished_trials(study) if not t.user_attrs.get("cut_short")]
    front = [t for t in candidates if not any(
        o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in candidates)]
    unique = {tuple(t.values): t for t in sorted(front, key=lambda t: -t.number)}  # equal points: keep the earliest
    return sorted(unique.values(), key=lambda t: (t.values[0], t.values[1]))


_PICK = re.compile(r"^(min-kl):refusals<=([0-9.]+)$|^(min-refusals):kl<=([0-9.]+)$|^trial:(\d+)$|^auto$")


def check_pick_rule(rule: str) -> None:
    if not _PICK.match(rule.strip()):
        raise UserError(f"unknown pick rule '{rule}'; use auto, min-kl:refusals<=0.05, min-refusals:kl<=0.2 or trial:17")


def pick_trial(study: optuna.Study, rule: str, total: int) -> optuna.trial.FrozenTrial:
    """Choose the trial to save. `refusals<=R`: R below 1 is a rate, else a count. `auto`: the lowest KL among
    trials within one standard error of the fewest refusals (or within 5 %), see pick.py."""
    check_pick_rule(rule)
    match = _PICK.match(rule.strip())
    front = pareto_front(study)
    if not front:
        raise UserError("no trial finished with a full measurement yet; run more trials")
    if match.group(5):
        number = int(match.group(5))
        for trial in finished_trials(study):
            if trial.number == number and not trial.user_attrs.get("cut_short"):
                return trial
        raise UserError(f"trial {number} did not finish with a full measurement; the Pareto front is "
                        f"{', '.join(str(t.number) for t in front)}")
    if match.group(1):
        limit = float(match.group(2))
        allowed = limit * total if limit < 1 else limit
        within = [t for t in front if t.values[0] <= allowed + 1e-9]
        if not within:
            raise UserError(f"no trial has refusals <= {match.group(2)} (best: {int(front[0].values[0])}/{total}); "
                            "relax the rule or run more trials")
        return min(within, key=lambda t: t.values[1])
    if match.group(3):
        limit = float(match.group(4))
        within = [t for t in front if t.values[1] <= limit]
        if not within:
            raise UserError(f"no trial has KL <= {limit} (lowest: {min(t.values[1] for t in front):.3f}); "
                            "relax the rule or run more trials")
        return min(within, key=lambda t: (t.values[0], t.values[1]))
    return front[auto_choice([(t.values[0], t.values[1]) for t in front], total)]  # see pick.py
