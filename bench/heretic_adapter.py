"""Helper of bench/vs_heretic.sh (a benchmark, not part of abliterate). Three sub-commands:

  prompts OUT_DIR TUNE_PROMPTS DIRECTION_PROMPTS   (abliterate's venv)
      Write abliterate's bundled prompt splits as plain text files (one prompt per line, the format Heretic
      reads without `datasets`): {harmful,harmless}-train.txt (first DIRECTION_PROMPTS of the train split:
      refusal directions) and {harmful,harmless}-tune.txt (first TUNE_PROMPTS of the tune split: what every
      trial is measured on). These are exactly the prompts `abliterate run` takes for the same settings.

  heretic SAVE_DIR RESULT_JSON                      (Heretic's venv, run in the folder holding its config.toml)
      Run Heretic's own `heretic.main.main()` unattended. Heretic 1.4 has no headless mode: after the search it
      asks (questionary menus) which Pareto-optimal trial to use and what to do with it. Its prompt functions
      are replaced here by fixed answers: pick a trial by abliterate's `--pick auto` rule (src/abliterate/search/pick.py,
      loaded from its file: the lowest KL among Pareto trials within one standard error of the fewest refusals
      or within 5 %), "Save the model to a
      local folder" -> SAVE_DIR (merged full model; export_strategy = "merge" in config.toml), then leave.
      Any other question is an error (so the benchmark never hangs). The choice goes to RESULT_JSON.

  timing JOURNAL STUDY_NAME                         (either venv: needs only optuna)
      Print one JSON object with the study's finished trials and the search phase's timing from Optuna's own
      per-trial datetime_start / datetime_complete: span_s = last completion - first start.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

PICK_RULE = Path(__file__).resolve().parents[1] / "src" / "abliterate" / "search" / "pick.py"


def write_prompts(out_dir: str, tune_prompts: int, direction_prompts: int) -> None:
    from abliterate.core.prompts import load_prompts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("harmful", "harmless"):
        for split, limit in (("train", direction_prompts), ("tune", tune_prompts)):
            prompts = load_prompts(kind, None, split)[:limit]
            if len(prompts) < limit:
                sys.exit(f"only {len(prompts)} {kind} prompts in the {split} split, {limit} asked")
            bad = [p for p in prompts if "\n" in p or "\r" in p or p != p.strip() or not p]
            if bad:  # Heretic's text format is one prompt per line, stripped
                sys.exit(f"{kind}/{split}: {len(bad)} prompts do not fit one stripped line each, e.g. {bad[0]!r}")
            (out / f"{kind}-{split}.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
            print(f"{out / f'{kind}-{split}.txt'}: {len(prompts)} prompts")


def pick_like_abliterate(front: list, total: int):
    """abliterate's `auto` rule on Heretic's Pareto front (trials with user_attrs refusals, kl_divergence). The
    rule's file imports nothing from abliterate, so it loads in Heretic's virtualenv, where abliterate is absent."""
    spec = importlib.util.spec_from_file_location("abliterate_pick", PICK_RULE)
    pick = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pick)
    points = [(t.user_attrs["refusals"], t.user_attrs["kl_divergence"]) for t in front]
    return front[pick.auto_choice(points, total)]


def run_heretic(save_dir: str, result_json: str) -> None:
    sys.argv = ["heretic"]  # settings come from ./config.toml only (pydantic-settings also parses argv)
    import heretic.main as heretic_main

    asked = {"trial": 0, "action": 0}
    record: dict = {}

    def trial_of(choice):
        return getattr(choice, "value", choice)

    def select(message: str, choices: list):
        if message.startswith("How would you like to proceed?"):  # a previous checkpoint: never resume
            return "restart"
        if message.startswith("Which trial do you want to use?"):
            asked["trial"] += 1
            if asked["trial"] > 1:
                return ""  # after saving: exit the program
            front = [trial_of(c) for c in choices if not isinstance(trial_of(c), str)]
            total = front[0].user_attrs["n_bad_prompts"]
            chosen = pick_like_abliterate(front, total)
            record.update(
                rule="abliterate --pick auto: lowest KL within one standard error of the fewest refusals, or 5%",
                trial_index=chosen.user_attrs["index"], trial_number=chosen.number,
                refusals=chosen.user_attrs["refusals"], total=total,
                base_refusals=chosen.user_attrs["base_refusals"], kl=chosen.user_attrs["kl_divergence"],
                direction_index=chosen.user_attrs["direction_index"], parameters=chosen.user_attrs["parameters"],
                pareto_front=[{"trial_index": t.user_attrs["index"], "refusals": t.user_attrs["refusals"],
                               "kl": t.user_attrs["kl_divergence"]} for t in front],
            )
            print(f"[adapter] choosing trial {chosen.user_attrs['index']} "
                  f"(refusals {record['refusals']}/{total}, KL {record['kl']:.4f})", flush=True)
            return chosen
        if message.startswith("What do you want to do with the decensored model?"):
            asked["action"] += 1
            return "Save the model to a local folder" if asked["action"] == 1 else ""
        raise RuntimeError(f"heretic_adapter: unexpected question {message!r}")

    def path(message: str) -> str:
        print(f"[adapter] {message} {save_dir}", flush=True)
        return save_dir

    def text(message: str, *args, **kwargs) -> str:
        raise RuntimeError(f"heretic_adapter: unexpected question {message!r}")

    heretic_main.prompt_select = select
    heretic_main.prompt_path = path
    heretic_main.prompt_text = text
    heretic_main.main()

    if not record or not (Path(save_dir) / "config.json").is_file():
        sys.exit("heretic did not save a model (see its output above)")
    Path(result_json).write_text(json.dumps(record, indent=2) + "\n")


def timing(journal: str, study_name: str) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(journal))
    study = optuna.load_study(study_name=study_name, storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        sys.exit(f"{journal}: no finished trial")
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    print(json.dumps({
        "trials": len(done),
        "all_trials": len(study.trials),
        "first_start": start.isoformat(),
        "last_complete": end.isoformat(),
        "span_s": (end - start).total_seconds(),
        "sum_trial_s": sum(durations),
        "trial_s": durations,
    }))


if __name__ == "__main__":
    command, *args = sys.argv[1:] or [""]
    if command == "prompts" and len(args) == 3:
        write_prompts(args[0], int(args[1]), int(args[2]))
    elif command == "heretic" and len(args) == 2:
        run_heretic(*args)
    elif command == "timing" and len(args) == 2:
        timing(*args)
    else:
        sys.exit(__doc__)
