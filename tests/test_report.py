"""`abliterate report RUN_DIR`: a synthetic run (a study made the way `abliterate run` makes it), finished or still
running, with too few trials, and bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import invoke
from test_compare import screenshot, svg_titles

from abliterate.measure.ablation import AblationParams
from abliterate.core.settings import SearchSpace
from abliterate.measure.directions import Directions
from abliterate.choose.report import TITLE_FRONT, TITLE_IMPORTANCE, TITLE_STRENGTH, TITLE_TIME, TITLE_WEIGHTS, kernel_curves, pareto_mask, run_report
from abliterate.search.study import open_study, suggest_params

N_LAYERS, HIDDEN, TUNE = 8, 16, 16


def make_run(path, trials: int, saved: bool = True, directions: bool = True, running: bool = False):
    """A run directory as `abliterate run` leaves it: run.json, directions.safetensors, study.journal whose trials
    carry their AblationParams in user_attrs, and (when saved) abliteration.json naming the chosen trial."""
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"identity": {"model": "tiny-test", "tune_prompts": TUNE, "eval_prompts": 8,
                                                            "judge": "phrase"}}))
    study = open_study(str(path / "study.journal"), 0, 2)
    study.set_user_attr("tune_prompts", TUNE)
    rng = random.Random(0)
    for number in range(trials):
        trial = study.ask()
        trial.set_user_attr("params", suggest_params(trial, SearchSpace(), N_LAYERS).to_dict())
        if number % 4 == 3:
            trial.set_user_attr("cut_short", True)
            study.tell(trial, [float(TUNE), 0.9])
        else:
            study.tell(trial, [float(rng.randint(0, TUNE)), rng.random() * 0.5])
    if running:
        study.ask()  # a trial in progress
    if directions:
        torch.manual_seed(0)
        harmful = torch.randn(N_LAYERS, HIDDEN, dtype=torch.float64) * torch.arange(1, N_LAYERS + 1)[:, None]
        harmless = torch.randn(N_LAYERS, HIDDEN, dtype=torch.float64)
        Directions(torch.nn.functional.normalize((harmful - harmless).float(), dim=-1), harmful, harmless,
                   {"harmful_count": 4, "harmless_count": 4}).save(path / "directions.safetensors")
    if saved:
        from abliterate.search.study import pick_trial

        chosen = pick_trial(study, "auto", TUNE)
        metrics = {"refusals": 1, "total": 8, "kl": 0.12, "kl_multi_token": 0.02}
        (path / "abliteration.json").write_text(json.dumps({
            "base_model": "tiny-test", "trial": chosen.number, "parameters": chosen.user_attrs["params"],
            "settings": {"pick": "auto"},
            "metrics": {"base": {"tune": {**metrics, "refusals": 14, "total": 16}, "eval": {**metrics, "refusals": 7}},
                        "abliterated": {"tune": {**metrics, "total": 16}, "eval": metrics}}}))
    return study


def test_report_of_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, trials=12)
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    document = (run_dir / "report.html").read_text()
    assert svg_titles(document) == [TITLE_FRONT, TITLE_TIME, TITLE_IMPORTANCE, TITLE_STRENGTH, TITLE_WEIGHTS]
    record = json.loads((run_dir / "abliteration.json").read_text())
    assert f"trial {record['trial']} (saved)" in document and "eval (held out)" in document
    assert "<script" not in document
    # the front table marks the chosen trial, and every parameter sampled appears in the importance plot
    assert '<tr class="mark"><td>' + str(record["trial"]) + "</td>" in document
    for name in ("attn.max_weight", "mlp.min_weight_distance", "norm_preserving"):
        assert name in document
    out = tmp_path / "elsewhere.html"
    assert invoke("report", run_dir, "-o", out).exit_code == 0 and out.read_text().count("<svg") == document.count("<svg")


def test_report_of_a_running_search_with_too_few_trials(tmp_path):
    run_dir = tmp_path / "young"
    make_run(run_dir, trials=2, saved=False, directions=False, running=True)
    document = run_report(run_dir)
    assert svg_titles(document) == [TITLE_FRONT, TITLE_TIME]
    assert "parameter importance needs at least 3 finished trials; this search has 2" in document
    assert "not saved yet" in document and "no directions.safetensors yet" in document
    empty = tmp_path / "empty"
    make_run(empty, trials=0, saved=False, directions=True, running=True)
    document = run_report(empty)
    assert svg_titles(document) == [TITLE_STRENGTH]
    assert "no trial has finished with a full measurement yet" in document


def test_importance_of_constant_objectives_is_reported_not_raised(tmp_path):
    run_dir = tmp_path / "flat"
    run_dir.mkdir()
    study = open_study(str(run_dir / "study.journal"), 0, 2)
    for _ in range(4):
        trial = study.ask()
        trial.set_user_attr("params", suggest_params(trial, SearchSpace(), N_LAYERS).to_dict())
        study.tell(trial, [3.0, 0.2])
    document = run_report(run_dir)
    assert TITLE_IMPORTANCE not in svg_titles(document)
    assert "parameter importance" in document


def test_kernel_curves_and_pareto_mask():
    params = AblationParams.from_dict({"components": {
        "attn": {"direction_index": 3, "kernel": {"max_weight": 1.0, "max_weight_position": 4, "min_weight": 0.5,
                                                  "min_weight_distance": 2}},
        "mlp": {"direction_index": None, "kernel": {"max_weight": 0.8}}}})
    curves = kernel_curves(params, 8)
    assert curves["attn"] == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 0.75, 0.5, 0.0]) and curves["mlp"] == pytest.approx([0.8] * 8)
    assert pareto_mask([(1, 0.1), (0, 0.3), (1, 0.2), (0, 0.3)]) == [True, True, False, True]


def test_report_bad_input(tmp_path):
    for target, fragment in ((tmp_path / "missing", "is not a directory"), (tmp_path, "holds no search")):
        result = invoke("report", target)
        assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith("error: ")
        assert fragment in result.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "study.journal").write_text("")
    result = invoke("report", tmp_path / "broken")
    assert result.exit_code == 2 and "holds no abliterate search" in result.output
    make_run(tmp_path / "ok", trials=3, saved=False)
    result = invoke("report", tmp_path / "ok", "-o", tmp_path / "no" / "dir" / "r.html")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_run_report_renders_in_chromium(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, trials=8)
    assert invoke("report", run_dir).exit_code == 0
    screenshot(run_dir / "report.html", tmp_path / "run.png")


@pytest.mark.parametrize("trials", [1])
def test_single_trial_run(tmp_path, trials):
    run_dir = tmp_path / "one"
    make_run(run_dir, trials=trials, saved=False)
    document = run_report(run_dir)
    assert "needs at least 3 finished trials" in document and TITLE_FRONT in svg_titles(document)
