"""The `abliterate` command line: thin commands over the library. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from abliterate.errors import UserError
from abliterate.core.load import DEFAULT_MODEL

_MODEL_HELP = "Model: 'tiny' (bundled default), a local HF directory, a .gguf file, or a hub id."


class _Group(click.Group):
    """Turns UserError into `error: ...` + exit 2 and Ctrl-C into exit 130, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def model_options(function, default_dtype="auto"):
    """Options shared by every command that loads a model."""
    decorators = [
        click.argument("model", default=DEFAULT_MODEL, required=False),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL."),
        click.option("--dtype", default=default_dtype, show_default=True,
                     help="auto (fastest correct for the device, measured on CPU), checkpoint (as stored), "
                          "float32, bfloat16, float16."),
        click.option("--device-map", default=None,
                     help="Passed to transformers/accelerate: auto, cpu, cuda:0, or a JSON map. Default: auto on GPU."),
        click.option("--trust-remote-code", is_flag=True, help="Run the model repository's own code (off unless asked)."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def prompt_options(function):
    decorators = [
        click.option("--harmful", default="harmful", show_default=True,
                     help="Harmful prompts: bundled set name, .txt/.jsonl/.csv/.parquet file, or dataset id."),
        click.option("--harmless", default="harmless", show_default=True, help="Harmless prompts, same forms."),
        click.option("--column", default=None, help="Column holding the prompts (jsonl/csv/parquet/datasets)."),
        click.option("--split", default=None,
                     help="Split: train/tune/eval for the bundled sets (default train), or a dataset split."),
        click.option("--system-prompt", default=None,
                     help="System prompt for the chat template ('' for none). Default: 'You are a helpful assistant.'"),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _load(model, revision, dtype, device_map, trust_remote_code):
    from abliterate.core.load import load_model

    with _status(f"loading {model}"):
        return load_model(model, dtype=dtype, device_map=device_map, revision=revision,
                          trust_remote_code=trust_remote_code)


def _status(message: str):
    from rich.console import Console

    return Console(stderr=True).status(message)


def _progress_bar(total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), transient=True,
                        console=__import__("rich.console").console.Console(stderr=True))
    task = progress.add_task(description, total=total)
    return progress, (lambda n: progress.advance(task, n))


def _read_prompt_sets(harmful, harmless, column, split, default_split="train"):
    from abliterate.core.prompts import BUNDLED_SETS, load_prompts

    def one(source):
        chosen = split if split is not None else (default_split if source in BUNDLED_SETS else None)
        return load_prompts(source, column=column, split=chosen)

    return one(harmful), one(harmless)


def ablation_options(function):
    """Which ablation: one direction everywhere (--layer/--weight/--components/--norm-preserving) or --params."""
    decorators = [
        click.option("--layer", type=float, default=None,
                     help="Take the direction at this (fractional) layer and ablate it everywhere."),
        click.option("--weight", type=float, default=1.0, show_default=True, help="Ablation strength with --layer."),
        click.option("--params", "params_file", default=None,
                     help="A full parameter set (JSON: a run's abliteration.json or its 'parameters') instead of --layer."),
        click.option("--components", default="attn,mlp", show_default=True, help="With --layer: which components to edit."),
        click.option("--norm-preserving", is_flag=True, help="With --layer: keep each input feature's write vector length."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _ablation_params(layer, weight, params_file, components, norm_preserving):
    from abliterate.measure.ablation import AblationParams
    from abliterate.core.arch import COMPONENT_KINDS

    if (layer is None) == (params_file is None):
        raise UserError("give exactly one of --layer L (one direction everywhere) or --params FILE.json")
    if params_file:
        return AblationParams.from_file(params_file)
    kinds = tuple(k.strip() for k in components.split(",") if k.strip())
    unknown = [k for k in kinds if k not in COMPONENT_KINDS]
    if unknown or not kinds:
        raise UserError(f"--components takes a comma list of {', '.join(COMPONENT_KINDS)}; got '{components}'")
    return AblationParams.single_direction(layer, weight, kinds, norm_preserving)


@click.group(cls=_Group)
@click.version_option(package_name="abliterate")
def main():
    """Measure refusal directions in a language model and ablate them."""


@main.command()
@model_options
@prompt_options
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the directions (.safetensors).")
@click.option("--limit", type=int, default=None, help="Use at most this many prompts of each set.")
@click.option("--projected/--no-projected", default=True, show_default=True,
              help="Remove each direction's component along the harmless mean (as `run` does by default).")
@click.option("--winsorize", type=float, default=None,
              help="Clamp each residual at this quantile of |h| before averaging (`run` uses 0.99; default: no clamping).")
@click.option("--refused-only", is_flag=True,
              help="Only the harmful prompts the model refuses (judged at 32 new tokens; as `run` does by default; all "
                   "of them when it refuses fewer than 8).")
@click.option("--format", "formats", type=click.Choice(["safetensors", "pt"]), default="safetensors", show_default=True,
              help="'pt' also writes a plain [layers, hidden] tensor .pt beside the safetensors.")
@click.option("--batch-size", type=int, default=16, show_default=True)
def directions(model, revision, dtype, device_map, trust_remote_code, harmful, harmless, column, split, system_prompt,
               output, limit, projected, winsorize, refused_only, formats, batch_size):
    """Measure per-layer refusal directions from harmful vs harmless prompts."""
    from abliterate.measure.directions import measure_directions

    output_path = Path(output)
    if not output_path.parent.exists():
        raise UserError(f"directory {output_path.parent} does not exist; create it or choose another -o")
    if batch_size <= 0:
        raise UserError("--batch-size must be positive")
    harmful_prompts, harmless_prompts = _read_prompt_sets(harmful, harmless, column, split)
    if limit is not None:
        if limit <= 0:
            raise UserError("--limit must be positive")
        harmful_prompts, harmless_prompts = harmful_prompts[:limit], harmless_prompts[:limit]
    loaded = _load(model, revision, dtype, device_map, trust_remote_code)
    offered = len(harmful_prompts)
    if refused_only:
        from abliterate.measure.evaluate import refused_subset
        from abliterate.core.judges import get_judge
        from abliterate.core.prompts import DEFAULT_SYSTEM_PROMPT, format_prompts

        click.echo(f"finding the harmful prompts the model refuses (of {offered})", err=True)
        formatted = format_prompts(loaded.tokenizer, harmful_prompts,
                                   DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt)
        refused = refused_subset(loaded.model, loaded.tokenizer, harmful_prompts, formatted, get_judge(), 32, batch_size)
        if refused is None:
            click.echo("the model hardly refuses them: directions from all of them", err=True)
        harmful_prompts = refused or harmful_prompts
    progress, advance = _progress_bar(len(harmful_prompts) + len(harmless_prompts), "measuring residuals")
    with progress:
        result = measure_directions(loaded, harmful_prompts, harmless_prompts, system_prompt=system_prompt,
                                    batch_size=batch_size, projected=projected, winsorize_quantile=winsorize,
                                    progress=advance, metadata={"harmful_offered": offered,
                                                                "harmful_filter": "refused" if refused_only else "all"})
    result.save(output_path, also_pt=formats == "pt")
    suggested = round(0.65 * (result.n_layers - 1))
    click.echo(f"wrote {output_path}: {result.n_layers} layers x {result.hidden_size}, from {len(harmful_prompts)} harmful "
               f"(of {offered}) and {len(harmless_prompts)} harmless prompts")
    click.echo(f"next: abliterate apply {model} --directions {output_path} --layer {suggested} -o OUT_DIR "
               "(directions from 55-75% depth usually work best)")


@main.command()
@functools.partial(model_options, default_dtype="checkpoint")
@click.option("--directions", "directions_file", required=True, help="Directions file (.safetensors, or .pt of other tools).")
@ablation_options
@click.option("-o", "--output", "output", required=True, help="Output directory (a complete HF model).")
def apply(model, revision, dtype, device_map, trust_remote_code, directions_file, layer, weight, params_file, components,
          norm_preserving, output):
    """Bake an ablation into the weights and save a complete HF model."""
    from abliterate.measure.ablation import bake, plan_edits
    from abliterate.measure.directions import Directions
    from abliterate.core.save import check_output_dir, save_hf

    gguf_out = output.lower().endswith(".gguf")
    if gguf_out:
        if not model.lower().endswith(".gguf"):
            raise UserError("-o FILE.gguf needs a .gguf MODEL (GGUF in, GGUF out); "
                            "for an HF model, apply to a directory and use `abliterate export gguf`")
        if Path(output).exists():
            raise UserError(f"output {output} already exists; choose another -o or remove it")
        dtype = "float32" if dtype == "checkpoint" else dtype  # edit the dequantised weights at full precision
    else:
        check_output_dir(output)
    params = _ablation_params(layer, weight, params_file, components, norm_preserving)
    refusal = Directions.load(directions_file)
    loaded = _load(model, revision, dtype, device_map, trust_remote_code)
    refusal = refusal.fitted_to(loaded.adapter)
    edits = plan_edits(loaded.adapter, refusal.directions, params)
    with _status("editing weights"):
        bake(edits, params.norm_preserving)
    if gguf_out:
        from abliterate.ship.gguf_edit import edited_parameters, write_edited_gguf

        with _status(f"writing {output}"):
            report = write_edited_gguf(Path(loaded.source.path) / loaded.source.gguf_file, output, loaded.model,
                                       edited_parameters(edits))
        retyped = sorted({f"{a}→{b}" for a, b in report.retyped.values()})
        click.echo(f"wrote {output}: {report.tensors_edited} tensors re-encoded, every other tensor and all metadata "
                   f"copied" + (f"; re-encoded as the nearest type the gguf library writes: {', '.join(retyped)}"
                                if retyped else ""))
        return
    record = {
        "base_model": loaded.source.reference,
        "revision": loaded.source.revision,
        "directions": {"file": str(directions_file), **refusal.metadata},
        "parameters": params.to_dict(),
        "edited_components": len(edits),
    }
    with _status(f"saving {output}"):
        save_hf(loaded.model, loaded.tokenizer, output, {"abliteration.json": record})
    click.echo(f"wrote {output}: {len(edits)} component edits baked into {loaded.adapter.model_type} weights")


def _default_run_output(name: str | None, model: str) -> str:
    return f"abliterate-{name or Path(model.rstrip('/')).name.removesuffix('.gguf') or 'model'}"


@main.command(name="run")
@click.argument("model", required=False)
@click.option("-o", "--output", default=None, help="Output directory (default: ./abliterate-<model name>). Holds the run state; "
              "running the same command again resumes.")
@click.option("--trials", type=int, default=None, help="Trials in total (default 50).")
@click.option("--startup-trials", type=int, default=None, help="Random trials before TPE (default 12).")
@click.option("--seed", type=int, default=None, help="Sampler seed (default 0).")
@click.option("--pick", default=None, help="Which trial to save without asking: auto (default: the lowest KL within one standard "
              "error of the fewest refusals), min-kl:refusals<=0.05, min-refusals:kl<=0.2, trial:17.")
@click.option("--config", "config_file", default=None, help="TOML settings file (default ./config.toml if present).")
@click.option("--harmful", default=None, help="Harmful prompts (default: the bundled set and its splits).")
@click.option("--harmless", default=None, help="Harmless prompts.")
@click.option("--column", default=None, help="Column holding the prompts.")
@click.option("--tune-prompts", type=int, default=None, help="Prompts per trial from the tune split (default 48).")
@click.option("--eval-prompts", type=int, default=None, help="Held-out prompts for the final report (default 100).")
@click.option("--max-new-tokens", type=int, default=None, help="Generation budget per response (default 32).")
@click.option("--judge", default=None, help="Refusal judge: classifier (default), phrase, embedding.")
@click.option("--dtype", default=None, help="auto (default), float32, bfloat16, float16.")
@click.option("--device-map", default=None, help="Passed to transformers/accelerate.")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Run the model repository's own code.")
@click.option("--name", default=None, help="Name of the result: output ./abliterate-NAME, NAME-QUANT.gguf, Ollama model NAME.")
@click.option("--export", "export_targets", default=None, help="After saving, also export: gguf, ollama (comma list).")
@click.option("--quant", default=None, help="GGUF quantisation for --export (default q4_k_m).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT_DIR with the settings it was started with "
              "(flags given now may change trials, pick, seed; the same command without --resume also continues).")
@click.option("--print-config", is_flag=True, help="Print every setting with its default (config.default.toml) and exit.")
def run_command(model, output, config_file, print_config, export_targets, resume, **flags):
    """Search for the best ablation of MODEL (default: the bundled tiny model) and save it, measured."""
    from abliterate.core.settings import default_toml, load_settings
    from abliterate.core.rundir import stored_settings
    from abliterate.search.run import check_exports, run, ship
    from abliterate.search.study import check_pick_rule

    if print_config:
        click.echo(default_toml(), nl=False)
        return
    flags["trust_remote_code"] = flags["trust_remote_code"] or None  # unset unless given: env/TOML may set it
    if export_targets is not None:
        flags["export"] = [target.strip() for target in export_targets.split(",") if target.strip()]
    given = {key: value for key, value in {"model": model, **flags}.items() if value is not None}
    if resume:
        output = output or _default_run_output(given.get("name"), given.get("model", DEFAULT_MODEL))
        given = {**stored_settings(Path(output)), **given}  # what defines the run comes from the run itself
    settings = load_settings(config_file, **given)
    check_pick_rule(settings.pick)
    check_exports(settings)
    output = output or _default_run_output(settings.name, settings.model)
    from abliterate.cli.progress import RunDisplay

    display = RunDisplay(interactive=sys.stdin.isatty() and sys.stdout.isatty() and flags.get("pick") is None)
    try:
        with display:
            result = run(settings, Path(output), display)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished trials are kept in {output}; `abliterate run --resume -o {output}` "
                   "continues", err=True)
        sys.exit(130)
    display.summary(result)
    for kind, path in ship(Path(output), settings, display).items():
        click.echo(f"{kind}: {path}")
    if display.upload_repo:
        from abliterate.ship import publish

        try:
            url, _ = publish.push(output, display.upload_repo, status=lambda line: click.echo(line, err=True))
        except UserError as error:
            raise UserError(f"saved in {output}, not uploaded: {error}; then `abliterate push {output} --repo "
                            f"{display.upload_repo}`") from None
        click.echo(f"uploaded: {url}")


@main.command(name="eval")
@model_options
@click.option("--base", default=None,
              help="Base model for KL. Default: the base_model recorded in MODEL/abliteration.json, if any.")
@click.option("--harmful", default="harmful", show_default=True, help="Harmful prompts (bundled set, file or dataset id).")
@click.option("--harmless", default="harmless", show_default=True, help="Benign prompts for KL.")
@click.option("--column", default=None, help="Column holding the prompts (jsonl/csv/parquet/datasets).")
@click.option("--split", default=None, help="train/tune/eval (default: eval for the bundled sets, every prompt of a file).")
@click.option("--limit", type=int, default=None, help="At most this many prompts of each set.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Generation budget per response.")
@click.option("--kl-tokens", type=int, default=16, show_default=True, help="Tokens of the base's continuation for multi-token KL (0: off).")
@click.option("--judge", "judge_name", default="classifier", show_default=True, help="Refusal judge: classifier, phrase, embedding.")
@click.option("--system-prompt", default=None, help="System prompt ('' for none).")
@click.option("--perplexity", "perplexity_file", default=None, help="Also report perplexity on this UTF-8 text file.")
@click.option("--batch-size", type=int, default=0, show_default=True,
              help="0: automatic (the fastest that fits, measured; halved on out-of-memory).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_command(model, revision, dtype, device_map, trust_remote_code, base, harmful, harmless, column, split, limit,
                 max_new_tokens, kl_tokens, judge_name, system_prompt, perplexity_file, batch_size, as_json):
    """Measure refusals (held-out split by default) and KL against the base model."""
    import json as json_module

    from abliterate.measure.evaluate import Baseline, check_same_vocabulary, evaluate, perplexity
    from abliterate.measure.engines.transformers import choose_batch_size
    from abliterate.core.judges import get_judge
    from abliterate.core.prompts import format_prompts

    if max_new_tokens <= 0 or kl_tokens < 0 or batch_size < 0 or (limit is not None and limit <= 0):
        raise UserError("--max-new-tokens and --limit must be positive, --kl-tokens and --batch-size not negative")
    judge = get_judge(judge_name)
    harmful_prompts, harmless_prompts = _read_prompt_sets(harmful, harmless, column, split, default_split="eval")
    if limit:
        harmful_prompts, harmless_prompts = harmful_prompts[:limit], harmless_prompts[:limit]
    text = _read_utf8(perplexity_file) if perplexity_file else None
    base = base or _recorded_base(model)
    loaded = _load(model, revision, dtype, device_map, trust_remote_code)
    formatted_harmful = format_prompts(loaded.tokenizer, harmful_prompts, system_prompt)
    if not batch_size:
        with _status("choosing the batch size"):
            batch_size = choose_batch_size(loaded.model, loaded.tokenizer, formatted_harmful, new_tokens=max_new_tokens)
    baseline = None
    if base:
        base_loaded = loaded if base == model else _load(base, None, dtype, device_map, trust_remote_code)
        check_same_vocabulary(loaded.tokenizer, base_loaded.tokenizer)
        with _status("measuring the base model's benign answers"):
            baseline = Baseline.measure(base_loaded.model, base_loaded.tokenizer,
                                        format_prompts(base_loaded.tokenizer, harmless_prompts, system_prompt),
                                        kl_tokens, batch_size=batch_size)
        del base_loaded
    with _status(f"generating {len(harmful_prompts)} responses"):
        metrics = evaluate(loaded.model, loaded.tokenizer, formatted_harmful, judge, baseline, max_new_tokens, batch_size)
    from abliterate.core.prompts import BUNDLED_SETS

    default_label = "eval" if harmful in BUNDLED_SETS else "all prompts"
    metrics.extra.update(model=model, base=base, split=split or default_label, max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    if text is not None:
        metrics.extra["perplexity"] = perplexity(loaded.model, loaded.tokenizer, text)
    if as_json:
        click.echo(json_module.dumps(metrics.to_dict()))
        return
    _print_metrics(metrics)


def _read_utf8(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; re-save it as UTF-8") from None


def _recorded_base(model: str) -> str | None:
    import json as json_module

    record = Path(model) / "abliteration.json"
    if record.is_file():
        return json_module.loads(record.read_text()).get("base_model")
    return None


def _print_metrics(metrics) -> None:
    from rich.console import Console
    from rich.table import Table

    data = metrics.to_dict()
    table = Table(title=f"{data['model']} on the {data['split']} split" + (f", against {data['base']}" if data["base"] else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("refusals", f"{data['refusals']}/{data['total']} ({data['refusal_rate']:.0%})")
    table.add_row("first-token KL", "n/a (no --base)" if data["kl"] is None else f"{data['kl']:.4f}")
    table.add_row("multi-token KL", "n/a" if data["kl_multi_token"] is None else f"{data['kl_multi_token']:.4f}")
    table.add_row("degenerate responses", str(data["degenerate"]))
    if "perplexity" in data:
        table.add_row("perplexity", f"{data['perplexity']:.2f}")
    table.add_row("judge", data["judge"])
    table.add_row("generation tokens saved by early decision", str(data["tokens_saved"]))
    Console().print(table)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def judges(as_json):
    """Precision and recall of each refusal judge on the bundled labelled set of real responses."""
    import json as json_module

    from rich.console import Console
    from rich.table import Table

    from abliterate.core.judges import DEFAULT_JUDGE, labelled_set_scores

    with _status("judging the labelled set"):
        scores = labelled_set_scores()
    if as_json:
        click.echo(json_module.dumps(scores))
        return
    table = Table(title=f"refusal judges on {next(iter(scores.values()))['n']} labelled responses")
    for column in ("judge", "precision", "recall", "F1"):
        table.add_column(column)
    for name, score in scores.items():
        label = f"{name} (default)" if name == DEFAULT_JUDGE else name
        table.add_row(label, f"{score['precision']:.2f}", f"{score['recall']:.2f}", f"{score['f1']:.2f}")
    Console().print(table)




# --- chat ---


@main.command()
@model_options
@click.option("--directions", "directions_file", default=None,
              help="Ablate at inference time (nothing saved): this directions file, with --layer or --params.")
@ablation_options
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
def chat(model, revision, dtype, device_map, trust_remote_code, directions_file, layer, weight, params_file, components,
         norm_preserving, system_prompt, max_new_tokens, temperature):
    """Chat with MODEL in the terminal: a saved model, a .gguf, or a base model ablated on the fly."""
    from abliterate.use.chat import Conversation, chat_loop, read_terminal_line, write_terminal

    if max_new_tokens <= 0 or temperature < 0:
        raise UserError("--max-new-tokens must be positive and --temperature not negative")
    ablation_asked = layer is not None or params_file is not None
    if ablation_asked and not directions_file:
        raise UserError("--layer/--params ablate at inference time and need --directions FILE")
    params = _ablation_params(layer, weight, params_file, components, norm_preserving) if directions_file else None
    refusal = _read_directions(directions_file) if directions_file else None
    loaded = _load(model, revision, dtype, device_map, trust_remote_code)
    with _inference_ablation(loaded, refusal, params):
        chat_loop(loaded.model, loaded.tokenizer, read_terminal_line, write_terminal, Conversation(system_prompt),
                  max_new_tokens, temperature)


def _read_directions(path):
    from abliterate.measure.directions import Directions

    return Directions.load(path)


def _inference_ablation(loaded, refusal, params):
    """The ablation as reversible hooks on the loaded model (a no-op context without one)."""
    import contextlib

    from abliterate.measure.ablation import ablate, plan_edits

    if refusal is None:
        return contextlib.nullcontext()
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    return ablate(edits, params.norm_preserving)


# --- models (catalog, estimate) ---


@main.group(cls=_Group, invoke_without_command=True)
@click.option("--memory", default=None, help="System RAM (or Apple unified memory), e.g. 16GB; binary units, 75% counted usable.")
@click.option("--vram", default=None, help="GPU memory, e.g. 8GB.")
@click.option("--use", type=click.Choice(["coding", "reasoning", "chat"]), default=None, help="Only models suited to this.")
@click.option("--context", type=int, default=None, help="Tokens of KV cache to budget for (default 8192).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_context
def models(ctx, memory, vram, use, context, as_json):
    """Recommended abliterated models by hardware tier, filtered by what fits in --memory / --vram."""
    if ctx.invoked_subcommand is not None:
        return
    import json as json_module

    from abliterate.choose.catalog import parse_memory, select

    result = select(memory=parse_memory(memory) if memory else None, vram=parse_memory(vram) if vram else None,
                    use=use, context=context)
    if as_json:
        click.echo(json_module.dumps(result))
        return
    _print_catalog(result, memory, vram)


def _print_catalog(result: dict, memory: str | None, vram: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from abliterate.choose.catalog import format_bytes, format_count

    where = ", ".join(part for part in (memory and f"{memory} RAM", vram and f"{vram} VRAM") if part)
    title = f"models that fit {where}" if where else "model catalog (give --memory/--vram to filter)"
    table = Table(title=f"{title}, {result['context']}-token context" + (f", for {result['use']}" if result["use"] else ""))
    for column in ("tier", "model", "hub id", "params", "ctx", "reasoning", "licence", "quant", "needs", "runs on"):
        table.add_column(column, justify="right" if column in ("params", "ctx", "needs") else "left")
    for row in result["models"]:
        name = row["key"] + (" *" if row["default"] else "")
        if row["superseded_by"]:
            name += f" (superseded → {row['superseded_by']})"
        fit = row["fit"]
        table.add_row(row["tier"], name, row["id"], format_count(row["parameters"]), f"{row['context'] // 1024}K",
                      "yes" if row["reasoning"] else "no",
                      row["licence"] + ("" if row["commercial_use"] else " (non-commercial)"),
                      fit["quant"], format_bytes(fit["needs_bytes"]), fit["placement"] or "-")
    console = Console()
    if not result["models"]:
        console.print(f"no catalog model fits {where}; the smallest need about 6 GiB (see `abliterate models`)")
        return
    console.print(table)
    console.print("* default pick of its tier; needs = weights in that quant + f16 KV cache + overhead; "
                  f"{result['usable_ram_fraction']:.0%} of --memory counted usable")
    if all(row["commercial_use"] for row in result["models"]):
        console.print("all allow commercial use under their licence's terms; --json: terms, sizes per quant, sources")
    if result["pick"]:
        console.print(f"pick: {result['pick']}")


@models.command(name="estimate")
@click.argument("model")
@click.option("--dtype", default=None, help="Weights dtype: float32, bfloat16, float16 (default: as stored).")
@click.option("--quant", default=None, help="GGUF quant instead: Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0, MXFP4, F16, BF16.")
@click.option("--context", type=int, default=None, help="Tokens of KV cache (default: 8192 or the model's maximum if smaller).")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences decoded at once (KV cache per sequence).")
@click.option("--revision", default=None, help="Hub revision of MODEL.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def models_estimate(model, dtype, quant, context, batch, revision, as_json):
    """Memory for MODEL's weights and KV cache, VRAM and system RAM apart, from its config.

    MODEL: a local HF directory, a .gguf file (its real tensor bytes), a catalog name or id, 'tiny', or a hub id
    (config.json is downloaded; nothing else)."""
    import json as json_module

    from rich.console import Console
    from rich.table import Table

    from abliterate.choose.catalog import estimate, format_bytes, format_count, read_model_config

    source = read_model_config(model, revision)
    result = estimate(source.config, dtype=dtype, quant=quant, context=context, batch=batch,
                      stored_weights_bytes=source.weights_bytes, stored_parameters=source.parameters)
    result = {"model": model, "source": source.source, **result}
    if as_json:
        click.echo(json_module.dumps(result))
        return
    fmt = result["format"]
    if fmt == "as stored" and source.config.get("gguf_file_type"):
        fmt = f"{source.config['gguf_file_type']} (as stored)"
    table = Table(title=f"{model}: {result['model_type']}, {format_count(result['parameters'])} parameters, {fmt} "
                        f"({result['bits_per_weight']:.2f} bits/weight), {result['context']} tokens x {batch}")
    table.add_column("")
    for column in ("on GPU: VRAM", "on GPU: system RAM", "CPU only: system RAM"):
        table.add_column(column, justify="right")
    weights, kv, overhead = result["weights_bytes"], result["kv_cache_bytes"], result["overhead_bytes"]
    table.add_row("weights", format_bytes(weights), "-", format_bytes(weights))
    table.add_row(f"KV cache ({'fp32' if result['kv_bytes_per_element'] == 4 else 'f16'})", format_bytes(kv), "-", format_bytes(kv))
    table.add_row("overhead", format_bytes(overhead), format_bytes(result["gpu"]["ram_bytes"]), format_bytes(overhead))
    table.add_row("total", format_bytes(result["gpu"]["vram_bytes"]), format_bytes(result["gpu"]["ram_bytes"]),
                  format_bytes(result["cpu"]["ram_bytes"]))
    Console().print(table)
    click.echo(f"config: {source.source}")


# --- push ---


@main.command()
@click.argument("out_dir")
@click.option("--repo", "repo_id", required=True, help="Hub repository to create or update: user/name.")
@click.option("--private", is_flag=True, help="Create the repository private (refused if it exists and is public).")
@click.option("--dry-run", is_flag=True, help="Print the files the commit would hold and stop (no token, no network).")
def push(out_dir, repo_id, private, dry_run):
    """Publish OUT_DIR (a saved model) to the Hugging Face Hub in one commit: weights, card, record, reproduce/.

    The token comes from HF_TOKEN or `hf auth login`; it is never written anywhere."""
    from abliterate.ship import publish

    publish.check_repo_id(repo_id)
    if dry_run:
        uploads = publish.plan_upload(out_dir, repo_id)
        click.echo(f"would {'create (private) or update' if private else 'create or update'} "
                   f"https://huggingface.co/{repo_id} with one commit of {len(uploads)} files "
                   f"({_megabytes(sum(u.size() for u in uploads))}):")
        for upload in uploads:
            origin = "generated" if isinstance(upload.source, bytes) else str(upload.source)
            click.echo(f"  {upload.path_in_repo:<40} {_megabytes(upload.size()):>9}  {origin}")
        return
    url, uploads = publish.push(out_dir, repo_id, private=private, status=lambda line: click.echo(line, err=True))
    click.echo(f"pushed {len(uploads)} files ({_megabytes(sum(u.size() for u in uploads))}) to {url}")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


# --- export ollama ---


@main.group(cls=_Group)
def export():
    """Export a model for other runtimes."""


@export.command(name="ollama")
@click.argument("model_or_gguf")
@click.option("--name", required=True, help="Ollama model name: lowercase letters, digits, - _ . (e.g. qwen-abliterated, me/qwen:0.5b).")
@click.option("--template", "template_file", default=None,
              help="Prompt template instead of the model's own: an Ollama Go template (used as is) or a Jinja chat template "
                   "(.jinja, translated).")
@click.option("--system", default=None, help="Default system prompt (Modelfile SYSTEM), used when a request has none.")
@click.option("-o", "--output", "out_dir", default=None, help="Directory for the Modelfile (default: beside the GGUF).")
@click.option("--no-create", is_flag=True, help="Only write the Modelfile and print the `ollama create` command.")
def export_ollama_command(model_or_gguf, name, template_file, system, out_dir, no_create):
    """Write an Ollama Modelfile for MODEL_OR_GGUF (a .gguf) and import it with `ollama create` when ollama is on PATH."""
    from abliterate.ship.ollama import export_ollama

    result = export_ollama(model_or_gguf, name, template_file=template_file, system=system, out_dir=out_dir,
                           create=not no_create)
    for warning in result.template.warnings:
        click.echo(f"warning: {warning}", err=True)
    template = result.template
    described = (f"{template.family} template" + (" with tools" if template.tools else "")) if template.template else "no TEMPLATE"
    stops = " ".join(template.stops) or "none"
    click.echo(f"wrote {result.modelfile}: {described}, stop words {stops}" + (", SYSTEM" if system is not None else ""))
    if result.created:
        click.echo(f"created Ollama model {name}; chat with it: ollama run {name}")
    else:
        click.echo(f"import it into Ollama with: {result.command_line}")


# --- export gguf ---


@export.command(name="gguf")
@click.argument("model_dir")
@click.option("-o", "--output", default=None, help="GGUF file to write (default: MODEL_DIR/../<name>-<quant>.gguf).")
@click.option("--quant", default="q4_k_m", show_default=True,
              help="f32, f16, bf16, q8_0 (written by the converter) or q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m, q4_k_s, "
                   "q4_k_m, q5_k_s, q5_k_m, q6_k (llama.cpp's quantiser).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Load the file in llama.cpp and compare its greedy continuations with the HF model's.")
@click.option("--verify-prompts", type=int, default=8, show_default=True, help="Bundled eval-split prompts to compare on.")
@click.option("--verify-tokens", type=int, default=16, show_default=True)
def export_gguf_command(model_dir, output, quant, verify, verify_prompts, verify_tokens):
    """Convert a saved HF model (e.g. an `abliterate run` output) to GGUF, quantise it, and check it in llama.cpp."""
    from abliterate.ship.gguf_export import check_quant, convert

    quant = check_quant(quant)
    source = Path(model_dir)
    if not source.is_dir():
        raise UserError(f"{model_dir} is not a directory; give a saved HF model directory (config.json + safetensors)")
    output = Path(output) if output else source.parent / f"{source.resolve().name}-{quant}.gguf"
    with _status(f"converting {source} to {output.name}"):
        convert(source, output, quant)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.0f} MiB, {quant})")
    if verify:
        _verify_gguf(source, output, quant, verify_prompts, verify_tokens)


def _verify_gguf(hf_dir: Path, gguf_file: Path, quant: str, n_prompts: int, n_tokens: int) -> None:
    from abliterate.measure.engines.transformers import generate
    from abliterate.ship.gguf_export import compare_greedy, llama_cpp_greedy
    from abliterate.core.load import load_model
    from abliterate.core.prompts import format_prompts, load_prompts

    with _status("checking the GGUF in llama.cpp against the HF model"):
        loaded = load_model(str(hf_dir), dtype="float32")
        prompts = format_prompts(loaded.tokenizer, load_prompts("harmless", split="eval")[: n_prompts // 2]
                                 + load_prompts("harmful", split="eval")[: n_prompts - n_prompts // 2])
        hf_tokens = generate(loaded.model, loaded.tokenizer, prompts, n_tokens, batch_size=1).tokens
        prompt_ids = [loaded.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        del loaded
        agreement = compare_greedy(hf_tokens, llama_cpp_greedy(gguf_file, prompt_ids, n_tokens))
    click.echo(f"llama.cpp: first greedy token agrees on {agreement.first_token_matches}/{agreement.prompts} prompts, "
               f"{agreement.token_rate:.0%} of {agreement.tokens_compared} greedy tokens agree with transformers (float32)")
    if quant in ("f32", "f16", "bf16") and agreement.first_token_matches < agreement.prompts:
        raise UserError(f"llama.cpp's first tokens differ from the HF model's on {quant} weights: the export is wrong")


# --- serve ---


@main.command()
@model_options
@click.option("--directions", "directions_file", default=None,
              help="Ablate at inference time (nothing saved): this directions file, with --layer or --params.")
@ablation_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. 0.0.0.0 opens the model to your network: give --api-key then.")
@click.option("--port", type=int, default=11435, show_default=True,
              help="Port (beside Ollama's 11434, clear of llama.cpp's 8080 and vLLM's 8000, so they can run together).")
@click.option("--api-key", envvar="ABLITERATE_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every request (or set ABLITERATE_API_KEY).")
@click.option("--name", default=None, help="Model name in /v1/models and /api/tags (default: MODEL's directory or file name).")
@click.option("--max-tokens-limit", type=int, default=4096, show_default=True,
              help="Largest max_tokens (Ollama: num_predict) a request may ask for; also the default.")
@click.option("--max-queue", type=int, default=16, show_default=True,
              help="Requests that may wait while one generates; beyond that the answer is 503, retry later.")
def serve(model, revision, dtype, device_map, trust_remote_code, directions_file, layer, weight, params_file, components,
          norm_preserving, host, port, api_key, name, max_tokens_limit, max_queue):
    """Serve MODEL over HTTP: OpenAI-compatible /v1 (chat/completions, completions, models) and Ollama-compatible /api
    (chat, generate, tags). MODEL: a saved model, a .gguf, or a base model ablated on the fly (--directions with --layer
    or --params). One generation at a time; other requests wait their turn."""
    if max_tokens_limit <= 0 or max_queue < 0:
        raise UserError("--max-tokens-limit must be positive and --max-queue not negative")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535; got {port}")
    ablation_asked = layer is not None or params_file is not None
    if ablation_asked and not directions_file:
        raise UserError("--layer/--params ablate at inference time and need --directions FILE")
    params = _ablation_params(layer, weight, params_file, components, norm_preserving) if directions_file else None
    refusal = _read_directions(directions_file) if directions_file else None
    try:
        import uvicorn

        from abliterate.use.serve import create_app
    except ImportError as error:
        raise UserError(f"abliterate serve needs the serve extra ({error.name} is missing): "
                        "pip install 'abliterate[serve]'") from None
    listening = _listen(host, port)  # before loading: a port in use is told at once, and no one can take it meanwhile
    try:
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the "
                       "model", err=True)
        loaded = _load(model, revision, dtype, device_map, trust_remote_code)
        name = name or Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
        app = create_app(loaded.model, loaded.tokenizer, name, api_key=api_key, max_tokens_limit=max_tokens_limit,
                         max_queue=max_queue)
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"serving {name} on http://{shown}:{port}: OpenAI API at /v1, Ollama API at /api"
                   + (", API key required" if api_key else "") + "; Ctrl-C stops")
        with _inference_ablation(loaded, refusal, params):
            uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[listening])
    finally:
        listening.close()


def _listen(host: str, port: int):
    """A listening socket on host:port, or one line saying why not."""
    import errno
    import socket

    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=2048)
    except socket.gaierror:
        raise UserError(f"cannot listen on {host}: no such address here; use 127.0.0.1 (this machine only) or "
                        "0.0.0.0 (every interface)") from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} is in use; choose another with --port") from None
        if error.errno == errno.EACCES:
            raise UserError(f"no permission to listen on port {port}; choose one above 1023 with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None


# --- compare, verify, report ---


class _CompareGroup(_Group):
    """`abliterate compare MODEL_A MODEL_B ...` runs the comparison (hidden subcommand `models`); `reveal` is its
    one named subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["models", *args]
        elif not args:
            args = ["models"]
        return super().parse_args(ctx, args)


class _CompareModels(click.Command):
    def format_usage(self, ctx, formatter):
        formatter.write_usage(ctx.parent.command_path, "[OPTIONS] MODEL_A MODEL_B [MODEL ...]")


@main.group(cls=_CompareGroup)
def compare():
    """Compare models on the same prompts and decoding, against one base: refusals, over-refusals, KL, capability,
    consistency, speed, memory; an offline HTML report and a blind sample sheet.

    \b
    abliterate compare MODEL_A MODEL_B [MODEL ...] [--base BASE] [-o REPORT_DIR]   (options: compare models --help)
    abliterate compare reveal SHEET RATINGS                                        (after rating the sheet)

    MODEL: 'tiny', a saved directory, a .gguf, a hub id, or BASE::DIRECTIONS::PARAMS (an ablation applied in memory;
    PARAMS: a JSON file or layer=L[,weight=W]); NAME=MODEL names its row."""


@compare.command(name="models", cls=_CompareModels, hidden=True)
@click.argument("models", nargs=-1)
@click.option("--base", default=None, help="Base for KL (a row too). Default: the base the models record, else the first.")
@click.option("-o", "--output", default="compare-report", show_default=True, help="Report directory (must not exist or be empty).")
@click.option("--limit", type=int, default=32, show_default=True, help="Prompts per set: harmful (eval split), borderline benign, benign for KL.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Tokens per answer to harmful and borderline prompts.")
@click.option("--probe-tokens", type=int, default=128, show_default=True, help="Tokens per answer to capability probes and paraphrases.")
@click.option("--probes", type=int, default=40, show_default=True, help="Capability probes (spread over arithmetic, facts, code output, reasoning).")
@click.option("--paraphrases", type=int, default=10, show_default=True, help="Paraphrase groups (3 prompts each) for consistency.")
@click.option("--kl-tokens", type=int, default=16, show_default=True, help="Tokens of the base's continuation for multi-token KL.")
@click.option("--judge", "judge_name", default="classifier", show_default=True, help="Refusal judge: classifier, phrase, embedding.")
@click.option("--system-prompt", default=None, help="System prompt ('' for none).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="The same for every model (tokens/s depends on it).")
@click.option("--directions", "directions_file", default=None, help="The base's directions file for the strength plot.")
@click.option("--direction-prompts", type=int, default=16, show_default=True,
              help="Without directions: measure them on this many train prompts of each kind (0: no strength plot).")
@click.option("--sheet-prompts", type=int, default=12, show_default=True, help="Prompts on the blind sheet (half harmful, half borderline; 0: none).")
@click.option("--seed", type=int, default=None, help="Seed of the sheet's shuffle (default: random, kept in key.json).")
@click.option("--lm-eval", "lm_eval_tasks", default=None, help="Also run lm-evaluation-harness tasks (comma list), reported as deltas.")
@click.option("--lm-eval-limit", type=int, default=None, help="At most this many examples per lm-eval task.")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16, float16 (the same for every model).")
@click.option("--device-map", default=None, help="Passed to transformers/accelerate.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repositories' own code.")
@click.option("--json", "as_json", is_flag=True, help="Print the results (without answers) as one JSON object on stdout.")
def compare_models(models, base, output, limit, max_new_tokens, probe_tokens, probes, paraphrases, kl_tokens, judge_name,
                   system_prompt, batch_size, directions_file, direction_prompts, sheet_prompts, seed, lm_eval_tasks,
                   lm_eval_limit, dtype, device_map, trust_remote_code, as_json):
    """Compare MODEL_A MODEL_B ... (see `abliterate compare --help`)."""
    import json as json_module

    from abliterate.choose.compare import CompareSettings, check_output_dir, plan_models, read_prompt_sets, write_outputs
    from abliterate.choose.compare import compare as run_compare
    from abliterate.core.judges import get_judge

    tasks = [t.strip() for t in (lm_eval_tasks or "").split(",") if t.strip()]
    settings = CompareSettings(limit=limit, max_new_tokens=max_new_tokens, probe_tokens=probe_tokens, probes=probes,
                               paraphrase_groups=paraphrases, kl_tokens=kl_tokens, judge=judge_name, system_prompt=system_prompt,
                               batch_size=batch_size, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code,
                               directions=directions_file, direction_prompts=direction_prompts, sheet_prompts=sheet_prompts,
                               seed=seed, lm_eval_tasks=tasks, lm_eval_limit=lm_eval_limit)
    settings.check()
    plan_models(list(models), base)  # bad model specs fail before anything is loaded
    get_judge(judge_name)
    if directions_file and not Path(directions_file).is_file():
        raise UserError(f"directions file not found: {directions_file}")
    out = Path(output)
    check_output_dir(out)
    comparison = run_compare(list(models), base, settings, status=lambda line: click.echo(line, err=True))
    written = write_outputs(comparison, out, read_prompt_sets(settings))
    if comparison.lm_eval_note:
        click.echo(comparison.lm_eval_note, err=True)
    if as_json:
        click.echo(json_module.dumps(comparison.to_dict(answers=False)))
        return
    _print_comparison(comparison)
    click.echo(f"wrote {written['report']} and {written['results']}")
    if "sheet" in written:
        click.echo(f"blind sheet: {written['sheet']} (rate in {written['ratings']}; the key is {written['key']}: don't open it "
                   f"first), then: abliterate compare reveal {written['sheet']} {written['ratings']}")


def _print_comparison(comparison) -> None:
    from rich.console import Console
    from rich.table import Table

    from abliterate.choose.compare import TABLE_COLUMNS, lm_eval_deltas, table_rows

    table = Table(title=f"against {comparison.base_label}: {comparison.settings['prompt_counts']['harmful']} held-out harmful prompts, "
                        f"judge {comparison.settings['judge']}")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in table_rows(comparison):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped or logged: no truncated columns
    deltas = lm_eval_deltas(comparison.results, comparison.base_label)
    if deltas:
        for label, tasks in deltas.items():
            shown = ", ".join(f"{task} {metric} {value:+.4f}" for task, metrics in tasks.items() for metric, value in metrics.items())
            click.echo(f"lm-eval {label} − base: {shown or 'n/a'}")


@compare.command(name="reveal")
@click.argument("sheet")
@click.argument("ratings")
@click.option("--key", "key_file", default=None, help="The key (default: key.json beside SHEET).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def compare_reveal(sheet, ratings, key_file, as_json):
    """Join a reader's RATINGS of a blind SHEET (sheet.md or its directory) with its key: mean rating per model.

    RATINGS: the sheet's ratings.csv filled in (prompt_id, letter, rating), or JSON ([{prompt_id, letter, rating}] or
    {prompt_id: {letter: rating}}). Blank ratings are skipped."""
    import json as json_module

    from abliterate.choose.compare import read_key, read_ratings, reveal

    key, warnings = read_key(sheet, key_file)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    result = reveal(key, read_ratings(ratings), str(ratings))
    if as_json:
        click.echo(json_module.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    kinds = sorted({kind for m in result["models"] for kind in m["by_kind"]})
    table = Table(title=f"{result['rated']} of {result['answers']} answers rated")
    for column in ("model", "mean rating", "ratings", *kinds):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in result["models"]:
        table.add_row(m["model"], "n/a" if m["mean"] is None else f"{m['mean']:.2f}", str(m["ratings"]),
                      *("n/a" if kind not in m["by_kind"] else f"{m['by_kind'][kind]:.2f}" for kind in kinds))
    Console().print(table)


@main.command()
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("--base", default=None, help="The model it was made from. Default: base_model in MODEL/abliteration.json "
              "(or BASE of a BASE::DIRECTIONS::PARAMS variant).")
@click.option("--prompts", type=int, default=32, show_default=True, help="Held-out harmful prompts asked of the base.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True, help="Tokens per answer to the harmful prompts.")
@click.option("--reasoning-probes", type=int, default=10, show_default=True, help="Step-by-step probes (0: skip the check).")
@click.option("--reasoning-tokens", type=int, default=256, show_default=True, help="Tokens per reasoning answer (thinking models need more).")
@click.option("--kl-prompts", type=int, default=16, show_default=True, help="Benign prompts for KL.")
@click.option("--kl-tokens", type=int, default=16, show_default=True, help="Tokens of the base's continuation for multi-token KL (0: off).")
@click.option("--judge", "judge_name", default="classifier", show_default=True, help="Refusal judge: classifier, phrase, embedding.")
@click.option("--min-answered", type=float, default=0.8, show_default=True, help="Pass: this share of formerly refused prompts answered on topic.")
@click.option("--on-topic", type=float, default=0.5, show_default=True, help="Prompt-answer embedding similarity that counts as on topic.")
@click.option("--reasoning-slack", type=int, default=0, show_default=True, help="Reasoning probes the base solves that the model may fail.")
@click.option("--max-kl", type=float, default=0.4, show_default=True, help="Pass: first-token KL at most this.")
@click.option("--max-kl-multi", type=float, default=0.2, show_default=True, help="Pass: multi-token KL at most this.")
@click.option("--system-prompt", default=None, help="System prompt ('' for none).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16, float16.")
@click.option("--device-map", default=None, help="Passed to transformers/accelerate.")
@click.option("--trust-remote-code", is_flag=True, help="Run the model repositories' own code.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify(model, base, prompts, max_new_tokens, reasoning_probes, reasoning_tokens, kl_prompts, kl_tokens, judge_name,
           min_answered, on_topic, reasoning_slack, max_kl, max_kl_multi, system_prompt, batch_size, dtype, device_map,
           trust_remote_code, as_json):
    """Check an abliterated MODEL against its base: formerly refused prompts answered on topic, step-by-step reasoning
    intact, benign answers close to the base (KL). Exit 0: all pass; 1: a check fails; 2: bad input.

    MODEL: a saved directory, a .gguf, a hub id, or BASE::DIRECTIONS::PARAMS (an ablation applied in memory)."""
    import json as json_module

    from abliterate.choose.verify import VerifySettings
    from abliterate.choose.verify import verify as run_verify

    settings = VerifySettings(prompts=prompts, kl_prompts=kl_prompts, max_new_tokens=max_new_tokens,
                              reasoning_probes=reasoning_probes, reasoning_tokens=reasoning_tokens, kl_tokens=kl_tokens,
                              judge=judge_name, system_prompt=system_prompt, batch_size=batch_size, min_answered=min_answered,
                              on_topic=on_topic, reasoning_slack=reasoning_slack, max_kl=max_kl, max_kl_multi=max_kl_multi,
                              dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
    result = run_verify(model, base, settings, status=lambda line: click.echo(line, err=True))
    if as_json:
        click.echo(json_module.dumps(result.to_dict()))
    else:
        click.echo(f"verify {result.model} against {result.base} ({result.numbers['asked']} held-out harmful prompts, "
                   f"the base refuses {result.numbers['base_refused']}; judge {result.numbers['judge']})")
        for check in result.checks:
            click.echo(f"{'PASS' if check.passed else 'FAIL'}  {check.summary}")
            for line in check.details:
                click.echo(f"        {line}")
        passed = sum(c.passed for c in result.checks)
        click.echo(f"{'verified' if result.passed else 'not verified'}: {passed}/{len(result.checks)} checks pass")
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("run_dir")
@click.option("-o", "--output", default=None, help="HTML file to write (default: RUN_DIR/report.html).")
def report(run_dir, output):
    """Render a finished or running `abliterate run` directory as an offline HTML report: Pareto front, trials over
    time, parameter importance, per-layer direction strength, the chosen trial's layer weights."""
    from abliterate.choose.report import run_report, write_html

    target = Path(output) if output else Path(run_dir) / "report.html"
    if output and not target.parent.exists():
        raise UserError(f"directory {target.parent} does not exist; create it or choose another -o")
    with _status(f"rendering {run_dir}"):
        document = run_report(run_dir)
    write_html(target, document)
    click.echo(f"wrote {target}")


if __name__ == "__main__":  # keep last: every command above is registered by then
    main()
