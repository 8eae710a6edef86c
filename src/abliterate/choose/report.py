"""HTML reports that open offline: one self-contained file, inline CSS, plots as inline SVG (matplotlib, no
pyplot state, no JavaScript). Shared by `abliterate compare` (compare.py) and `abliterate report RUN_DIR` (below).

Every plot is an `<svg>` whose first child is a `<title>` naming it (what a screen reader and the tests read);
text stays text (svg.fonttype = none), so the file is small and searchable.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

from abliterate.errors import UserError

COMPONENT_STYLES = {"attn": "-", "mlp": "--"}
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1d1d1f;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#555;margin-top:0}table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.mark td{background:#fff7d6}figure{margin:1rem 0}figcaption{color:#555;font-size:.85rem;max-width:900px}
svg{max-width:100%;height:auto}.note{color:#7a4b00;background:#fff4e0;border-left:3px solid #e0a030;padding:.4rem .7rem}
code{background:#f3f3f3;padding:0 .2rem}dl{display:grid;grid-template-columns:max-content auto;gap:.2rem 1rem;font-size:.9rem}
dt{font-weight:600}dd{margin:0}
"""


# --- HTML -----------------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, subtitle: str, blocks: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>\n"
            + "\n".join(blocks) + "\n</body></html>\n")


def heading(text: str) -> str:
    return f"<h2>{esc(text)}</h2>"


def paragraph(text: str) -> str:
    return f"<p>{esc(text)}</p>"


def note(text: str) -> str:
    return f"<p class=\"note\">{esc(text)}</p>"


def table(headers: list[str], rows: list[list], marked: set[int] | None = None, caption: str | None = None) -> str:
    marked = marked or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    mark = ' class="mark"'
    body = "".join(f"<tr{mark if i in marked else ''}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def definitions(items: dict[str, str]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items.items()) + "</dl>"


def figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


def svg_titles(document: str) -> list[str]:
    """The title of every top-level plot in a report (what the tests check)."""
    return re.findall(r"<svg\b[^>]*>\s*<title>([^<]*)</title>", document)


# --- plots ----------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.0, rows: int = 1, cols: int = 1, **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def to_svg(fig, title: str) -> str:
    """The figure as an inline <svg> with <title>; ids salted by the title so several plots share one page."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": title}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.DOTALL)  # creator/format RDF: not needed inline
    end = text.index(">") + 1
    return (text[:end - 1] + f' role="img" aria-label="{esc(title)}">' + f"<title>{esc(title)}</title>" + text[end:]).strip()


def pareto_mask(points: list[tuple[float, float]]) -> list[bool]:
    """Which (refusals, kl) points no other point dominates (lower or equal in both, lower in one)."""
    return [not any(o[0] <= p[0] and o[1] <= p[1] and o != p for o in points) for p in points]


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_refusals_vs_kl(points: list[dict], title: str, ylabel: str, xlabel: str = "first-token KL vs base",
                        counts: bool = False) -> str:
    """points: {label, kl, refusals, front (bool), marked (bool, starred), muted (bool)}; `counts`: refusals are counts."""
    fig, axes = _figure(6.4, 4.2)
    ax = axes[0][0]
    if counts:
        _integer_ticks(ax.yaxis)
    muted = [p for p in points if p.get("muted")]
    if muted:
        ax.scatter([p["kl"] for p in muted], [p["refusals"] for p in muted], marker="x", color="#bbbbbb",
                   label="cut short (not measured in full)")
    normal = [p for p in points if not p.get("muted")]
    ax.scatter([p["kl"] for p in normal], [p["refusals"] for p in normal], color="#4a78b5", zorder=3, label="measured")
    front = sorted((p for p in normal if p.get("front")), key=lambda p: (p["kl"], p["refusals"]))
    if front:
        ax.step([p["kl"] for p in front], [p["refusals"] for p in front], where="post", color="#d0452f", zorder=2,
                label="Pareto front")
    for point in normal:
        if point.get("label") is not None:
            ax.annotate(str(point["label"]), (point["kl"], point["refusals"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    for point in (p for p in normal if p.get("marked")):
        ax.scatter([point["kl"]], [point["refusals"]], marker="*", s=220, color="#e0a030", edgecolor="k", zorder=4,
                   label="chosen")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return to_svg(fig, title)


def plot_bars(labels: list[str], metrics: dict[str, list[float | None]], title: str) -> str:
    """One small bar chart per metric, models on the x axis (missing values left empty)."""
    names = list(metrics)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = _figure(3.4 * cols, 2.6 * rows + 0.4, rows, cols)
    colours = [f"C{i % 10}" for i in range(len(labels))]
    for index, name in enumerate(names):
        ax = axes[index // cols][index % cols]
        values = [math.nan if v is None else v for v in metrics[name]]
        ax.bar(range(len(labels)), values, color=colours)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for index in range(len(names), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    fig.suptitle(title)
    return to_svg(fig, title)


def plot_strength(strength: list[float], relative: list[float] | None, title: str, marks: dict[str, float] | None = None) -> str:
    """‖μ⁺ − μ⁻‖ per layer (bars) and, if known, the same relative to ‖μ⁻‖ (line, right axis)."""
    fig, axes = _figure(6.4, 3.6)
    ax = axes[0][0]
    ax.bar(range(len(strength)), strength, color="#4a78b5", label="‖mean harmful − mean harmless‖")
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("layer")
    ax.set_ylabel("norm of the mean difference")
    handles, names = ax.get_legend_handles_labels()
    if relative is not None:
        twin = ax.twinx()
        twin.plot(range(len(relative)), relative, color="#d0452f", marker="o", markersize=3,
                  label="relative to ‖mean harmless‖ (right axis)")
        twin.set_ylabel("relative to the residual norm")
        twin.set_ylim(bottom=0)
        more_handles, more_names = twin.get_legend_handles_labels()
        handles, names = handles + more_handles, names + more_names
    for name, layer in (marks or {}).items():
        ax.axvline(layer, color="#e0a030", linestyle=":", linewidth=2)
        ax.annotate(name, (layer, ax.get_ylim()[1] * 0.95), fontsize=8, ha="center")
    ax.legend(handles, names, fontsize=8, loc="upper left")
    ax.set_title(title)
    return to_svg(fig, title)


def kernel_curves(params, n_layers: int) -> dict[str, list[float]]:
    """Each component's ablation weight per layer (0 where it is not edited), from AblationParams."""
    curves = {}
    for kind, component in params.components.items():
        curves[kind] = [component.kernel.weight(layer) or 0.0 for layer in range(n_layers)]
    return curves


def plot_layer_weights(curves: dict[str, dict[str, list[float]]], title: str) -> str:
    """curves: label → component → weight per layer."""
    fig, axes = _figure(6.4, 3.6)
    ax = axes[0][0]
    for index, (label, components) in enumerate(curves.items()):
        for kind, weights in components.items():
            ax.plot(range(len(weights)), weights, COMPONENT_STYLES.get(kind, "-"), color=f"C{index % 10}", marker=".",
                    label=f"{label} · {kind}")
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("layer")
    ax.set_ylabel("ablation weight")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return to_svg(fig, title)


def plot_trials_over_time(rows: list[dict], total: int | None, title: str) -> str:
    """rows: {number, minutes, refusals, kl, cut_short}; the running best of each objective as a step line."""
    fig, axes = _figure(6.4, 4.6, 2, 1, sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    rows = sorted(rows, key=lambda r: r["minutes"])
    _integer_ticks(top.yaxis)
    for ax, key, label in ((top, "refusals", f"refusals (of {total})" if total else "refusals"), (bottom, "kl", "first-token KL")):
        full = [r for r in rows if not r["cut_short"]]
        cut = [r for r in rows if r["cut_short"]]
        ax.scatter([r["minutes"] for r in full], [r[key] for r in full], color="#4a78b5", s=18, label="measured")
        if cut:
            ax.scatter([r["minutes"] for r in cut], [r[key] for r in cut], color="#bbbbbb", marker="x", s=18, label="cut short")
        best, running = math.inf, []
        for row in full:
            best = min(best, row[key])
            running.append(best)
        if full:
            ax.step([r["minutes"] for r in full], running, where="post", color="#d0452f", label="best so far")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    top.legend(fontsize=8, loc="best")
    bottom.set_xlabel("minutes since the first trial started")
    top.set_title(title)
    return to_svg(fig, title)


def plot_importance(importances: dict[str, dict[str, float]], title: str) -> str:
    """importances: objective → parameter → importance (fANOVA, sums to 1 per objective)."""
    params = sorted({p for values in importances.values() for p in values},
                    key=lambda p: -max(values.get(p, 0.0) for values in importances.values()))
    fig, axes = _figure(6.4, 0.9 + 0.32 * max(len(params), 1))
    ax = axes[0][0]
    height = 0.8 / max(len(importances), 1)
    for index, (objective, values) in enumerate(importances.items()):
        ax.barh([i + index * height for i in range(len(params))], [values.get(p, 0.0) for p in params], height=height,
                label=objective, color=f"C{index}")
    ax.set_yticks([i + height * (len(importances) - 1) / 2 for i in range(len(params))], params, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("importance (share of the objective's variance)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return to_svg(fig, title)


def strength_plot_from(directions, title: str, marks: dict[str, float] | None = None) -> str | None:
    """The per-layer strength plot from a Directions object; None when it holds no means (another tool's .pt)."""
    strength = directions.strength()
    if bool(strength.isnan().all()):
        return None
    relative = None
    if directions.harmless_mean is not None:
        relative = (strength / directions.harmless_mean.norm(dim=-1).float().clamp_min(1e-12)).tolist()
    return plot_strength(strength.tolist(), relative, title, marks)


def write_html(path: Path, document: str) -> Path:
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(document, encoding="utf-8")
    partial.rename(path)
    return path


# --- a run's report -------------------------------------------------------------------------------

TITLE_FRONT = "Pareto front: refusals vs KL (tune split)"
TITLE_TIME = "Trials over time"
TITLE_IMPORTANCE = "Parameter importance"
TITLE_STRENGTH = "Refusal-direction strength per layer"
TITLE_WEIGHTS = "Layer weights of the chosen trial"
MIN_TRIALS_FOR_IMPORTANCE = 3


def load_study_readonly(journal: Path):
    """The run's study, loaded without creating anything (a running search may be appending to it)."""
    import warnings

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from abliterate.core.rundir import STUDY_NAME

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return optuna.load_study(study_name=STUDY_NAME, storage=JournalStorage(JournalFileBackend(str(journal))))
    except (KeyError, ValueError) as error:
        raise UserError(f"{journal} holds no abliterate search ({error}); give the output directory of `abliterate run`") from None


def parameter_importances(study, min_trials: int = MIN_TRIALS_FOR_IMPORTANCE) -> tuple[dict | None, str | None]:
    """fANOVA importances per objective, or (None, why not)."""
    import optuna

    from abliterate.search.study import finished_trials

    done = finished_trials(study)
    if len(done) < min_trials:
        return None, (f"parameter importance needs at least {min_trials} finished trials; this search has {len(done)} "
                      "(it appears once more trials finish)")
    result = {}
    for index, name in enumerate(("refusals", "KL")):
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            values = optuna.importance.get_param_importances(study, evaluator=evaluator,
                                                             target=lambda t, i=index: t.values[i])
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            return None, (f"parameter importance could not be computed: {str(error).splitlines()[0]} (the objective "
                          "hardly varies over these trials; it appears once trials differ)")
        values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
        if values:
            result[name] = values
    if not result:
        return None, "parameter importance is undefined: every trial has the same objective values"
    return result, None


def _chosen_trial(study, record: dict | None, pick_rule: str, total: int):
    from abliterate.search.study import finished_trials, pareto_front, pick_trial

    if record and "trial" in record:
        for trial in finished_trials(study):
            if trial.number == record["trial"]:
                return trial, f"trial {trial.number} (saved)"
    if not pareto_front(study):
        return None, None
    try:
        trial = pick_trial(study, pick_rule, total)
    except UserError:
        trial = pick_trial(study, "auto", total)
    return trial, f"trial {trial.number} (the '{pick_rule}' pick so far; not saved yet)"


def run_report(run_dir: str | Path) -> str:
    """The HTML report of a finished or running `abliterate run` directory."""
    run = _load_run(Path(run_dir))
    blocks = (_run_section(run) + _saved_model_section(run) + _front_section(run) + _time_section(run)
              + _importance_section(run) + _directions_section(run))
    return page(f"abliterate run report: {run.dir.resolve().name}", run.subtitle, blocks)


def _load_run(run_dir: Path) -> SimpleNamespace:
    """Everything the report's sections read: the study, its trials, the saved record and the chosen trial."""
    from abliterate.core.rundir import RECORD_FILE, RUN_FILE, STUDY_FILE
    from abliterate.search.study import finished_trials, pareto_front

    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; give the output directory of `abliterate run`")
    journal = run_dir / STUDY_FILE
    if not journal.is_file():
        raise UserError(f"{run_dir} holds no search ({STUDY_FILE} is missing); give the output directory of `abliterate run`")
    state = _read_json(run_dir / RUN_FILE) or {}
    record = _read_json(run_dir / RECORD_FILE)
    study = load_study_readonly(journal)
    identity = state.get("identity", {})
    total = int(study.user_attrs.get("tune_prompts") or identity.get("tune_prompts") or 0)
    trials = study.get_trials(deepcopy=False)
    done = finished_trials(study)
    settings = (record or {}).get("settings", {})
    chosen, chosen_text = _chosen_trial(study, record, settings.get("pick", "auto"), total)
    states = {}
    for trial in trials:
        states[trial.state.name.lower()] = states.get(trial.state.name.lower(), 0) + 1
    status = "finished and saved" if record else "running or not saved yet"
    subtitle = (f"{identity.get('model', (record or {}).get('base_model', 'model'))}: {len(done)} finished trials "
                f"({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}); {status}; made {time.strftime('%Y-%m-%d %H:%M')}")
    return SimpleNamespace(dir=run_dir, record=record, study=study, identity=identity, total=total, done=done,
                           front=pareto_front(study), chosen=chosen, chosen_text=chosen_text, subtitle=subtitle)


def _run_section(run: SimpleNamespace) -> list[str]:
    facts = {"run directory": str(run.dir)}
    for key in ("model", "harmful", "harmless", "tune_prompts", "eval_prompts", "max_new_tokens", "kl_tokens", "judge", "dtype"):
        if key in run.identity:
            facts[key] = str(run.identity[key])
    if run.chosen_text:
        facts["chosen"] = run.chosen_text
    return [heading("Run"), definitions(facts)]


def _saved_model_section(run: SimpleNamespace) -> list[str]:
    from abliterate.search.study import quality_band

    record = run.record
    if not (record and "metrics" in record):
        return []
    rows = []
    for split, label in (("tune", "tune (optimised on)"), ("eval", "eval (held out)")):
        base, ablated = record["metrics"]["base"].get(split), record["metrics"]["abliterated"].get(split)
        if base and ablated:
            rows.append([label, f"{base['refusals']}/{base['total']}", f"{ablated['refusals']}/{ablated['total']}",
                         _fmt(ablated.get("kl")), _fmt(ablated.get("kl_multi_token")),
                         quality_band(ablated["refusals"] / max(ablated["total"], 1), ablated.get("kl") or 0.0)])
    return [heading("Saved model"), table(["split", "base refusals", "refusals", "KL", "multi-token KL", "rating"], rows)]


def _front_section(run: SimpleNamespace) -> list[str]:
    from abliterate.search.study import quality_band

    front, chosen, total = run.front, run.chosen, run.total
    if not front:
        return [heading("Pareto front"), note("no trial has finished with a full measurement yet; the front appears once one has")]
    front_numbers = {t.number for t in front}
    rows = [[t.number, f"{int(t.values[0])}/{total}" if total else int(t.values[0]), f"{t.values[1]:.3f}",
             quality_band(t.values[0] / max(total, 1), t.values[1])] for t in front]
    marked = {i for i, t in enumerate(front) if chosen is not None and t.number == chosen.number}
    points = [{"label": t.number, "kl": t.values[1], "refusals": t.values[0], "front": t.number in front_numbers,
               "muted": bool(t.user_attrs.get("cut_short")), "marked": chosen is not None and t.number == chosen.number}
              for t in run.done]
    plot = plot_refusals_vs_kl(points, TITLE_FRONT, f"refusals (of {total} tune prompts)" if total else "refusals", counts=True)
    return [heading("Pareto front"), table(["trial", "refusals", "KL", "rating"], rows, marked),
            figure(plot, "Every finished trial: measured trials in blue, trials cut short by their KL in grey (their "
                         "refusals are the pessimistic placeholder). The red steps join the Pareto front; the star is the "
                         "chosen trial.")]


def _time_section(run: SimpleNamespace) -> list[str]:
    done = run.done
    start = min((t.datetime_start for t in done if t.datetime_start), default=None)
    if start is None:
        return []
    rows = [{"number": t.number, "minutes": ((t.datetime_complete or t.datetime_start or start) - start).total_seconds() / 60,
             "refusals": t.values[0], "kl": t.values[1], "cut_short": bool(t.user_attrs.get("cut_short"))} for t in done]
    return [heading("Trials over time"),
            figure(plot_trials_over_time(rows, run.total, TITLE_TIME),
                   "Refusals and KL of each trial by the time it finished, with the best value so far.")]


def _importance_section(run: SimpleNamespace) -> list[str]:
    importances, why_not = parameter_importances(run.study)
    if not importances:
        return [heading("Parameter importance"), note(why_not)]
    return [heading("Parameter importance"),
            figure(plot_importance(importances, TITLE_IMPORTANCE),
                   "fANOVA importance (optuna.importance, seed 0) of each sampled parameter for each objective: "
                   "how much of the objective's variance over the trials it explains. Few trials make it noisy.")]


def _directions_section(run: SimpleNamespace) -> list[str]:
    from abliterate.core.rundir import DIRECTIONS_FILE
    from abliterate.measure.ablation import AblationParams
    from abliterate.measure.directions import Directions

    chosen = run.chosen
    blocks = [heading("Refusal direction and the chosen ablation")]
    if not (run.dir / DIRECTIONS_FILE).is_file():
        return blocks + [note(f"no {DIRECTIONS_FILE} yet: the search has not measured its directions")]
    directions = Directions.load(run.dir / DIRECTIONS_FILE)
    params = AblationParams.from_dict(chosen.user_attrs["params"]) if chosen is not None and "params" in chosen.user_attrs else None
    marks = {}
    if params is not None:
        for kind, component in params.components.items():
            if component.direction_index is not None:
                marks[f"{kind} direction"] = component.direction_index
    plot = strength_plot_from(directions, TITLE_STRENGTH, marks)
    if plot:
        count = directions.metadata.get("harmful_count")
        blocks.append(figure(plot, "‖mean harmful − mean harmless‖ of the last-token residual after each layer"
                             + (f" ({count} + {directions.metadata.get('harmless_count')} train prompts)" if count else "")
                             + "; the line divides it by the harmless mean's norm. Dotted: the direction the chosen trial uses."))
    if params is not None:
        blocks.append(figure(plot_layer_weights({run.chosen_text.split(" (")[0]: kernel_curves(params, directions.n_layers)},
                                                TITLE_WEIGHTS),
                             "Ablation weight per layer for each component (0: not edited), from the trial's kernel."))
    return blocks


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
