"""The run folder: what `abliterate run` writes, and what `report`, `publish`, the live display and the benchmarks read.

    run.json                what is being run (its identity: the settings that define it), base metrics, batch size
    directions.safetensors  the refusal directions the run measured
    study.journal           Optuna's append-only log of every trial
    abliteration.json       the record of the saved model (written last, with the model)

Everything a run needs to continue is in the folder from its first seconds, so the same command resumes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from abliterate.errors import UserError

FORMAT = 1  # run.json's layout; a reader refuses a newer one
RUN_FILE, STUDY_FILE, DIRECTIONS_FILE, RECORD_FILE = "run.json", "study.journal", "directions.safetensors", "abliteration.json"
STUDY_NAME = "abliterate"  # the Optuna study inside study.journal
# Settings that define what a run measures: changing them makes it a different run, not a continuation.
IDENTITY_KEYS = ("model", "revision", "harmful", "harmless", "column", "direction_prompts", "tune_prompts", "eval_prompts",
                 "max_new_tokens", "kl_tokens", "judge", "system_prompt", "dtype", "space", "search_prompts",
                 "early_verdicts", "winsorize", "direction_harmful", "quantize")
# What runs made before a setting existed did, so that resuming them with that setting is still recognised.
LEGACY_IDENTITY = {"search_prompts": "all", "early_verdicts": False, "winsorize": 1.0, "direction_harmful": "all", "quantize": "none"}


def identity(settings) -> dict:
    """The part of the settings (a RunSettings) that defines a run."""
    data = settings.model_dump(mode="json")
    return without_warm_start({key: data[key] for key in IDENTITY_KEYS})


def without_warm_start(run_identity: dict) -> dict:
    """`space.warm_start` only chooses a new study's first trials (a resumed study has queued them already), so it
    is no part of what a run measures: a run resumes whatever warm start it began with."""
    if isinstance(run_identity.get("space"), dict):
        run_identity = run_identity | {"space": {k: v for k, v in run_identity["space"].items() if k != "warm_start"}}
    return run_identity


def prepare(output: Path, settings) -> dict:
    """A new run folder, or the state of a previous run of the same model and settings (to resume)."""
    run_file = output / RUN_FILE
    if output.exists() and not output.is_dir():
        raise UserError(f"output {output} exists and is not a directory; choose another -o")
    if run_file.is_file():
        state = read_state(output)
        stored = without_warm_start(LEGACY_IDENTITY | state.get("identity", {}))
        wanted = identity(settings)
        if stored != wanted:
            changed = [key for key in IDENTITY_KEYS if stored.get(key) != wanted[key]]
            raise UserError(f"{output} holds a run with other settings ({', '.join(changed)}); "
                            "use the same settings to resume, or choose another -o")
        return state
    if output.exists() and any(output.iterdir()):
        raise UserError(f"output {output} exists and is not a previous run of this model; choose another -o")
    output.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "identity": identity(settings),
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(run_file, state)
    return state


def read_state(output: Path) -> dict:
    """run.json of the run in `output` ({} when there is none)."""
    run_file = output / RUN_FILE
    if not run_file.is_file():
        return {}
    try:
        state = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{run_file} is not valid JSON ({error}); delete the folder or choose another -o") from None
    if state.get("format", 1) > FORMAT:
        raise UserError(f"{output} was written by a newer abliterate (run format {state['format']}); upgrade to read it")
    return state


def stored_settings(output: Path) -> dict:
    """The settings that define the run in `output` (what `run --resume` continues without repeating them)."""
    if not (output / RUN_FILE).is_file():
        raise UserError(f"--resume: {output} holds no run (no {RUN_FILE}); start one without --resume, or give its -o")
    return LEGACY_IDENTITY | read_state(output)["identity"]


def saved_record(output: Path) -> dict | None:
    """abliteration.json of the model saved in `output`, if one was."""
    path = output / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: written beside, then renamed over."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.rename(path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
