"""The `abliterate` command line: thin commands over the library. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from abliterate.errors import UserError
from abliterate.load import DEFAULT_MODEL

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
    from abliterate.load import load_model

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
    from abliterate.prompts import BUNDLED_SETS, load_prompts

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
    from abliterate.ablation import AblationParams
    from abliterate.arch import COMPONENT_KINDS

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
@click.option("--projected", is_flag=True, help="Remove the harmless-mean component from each direction.")
@click.option("--winsorize", type=float, default=None, help="Clamp each residual at this quantile of |h| (e.g. 0.995).")
@click.option("--format", "formats", type=click.Choice(["safetensors", "pt"]), default="safetensors", show_default=True,
              help="'pt' also writes a plain [layers, hidden] tensor .pt beside the safetensors.")
@click.option("--batch-size", type=int, default=16, show_default=True)
def directions(model, revision, dtype, device_map, trust_remote_code, harmful, harmless, column, split, system_prompt,
               output, limit, projected, winsorize, formats, batch_size):
    """Measure per-layer refusal directions from harmful vs harmless prompts."""
    from abliterate.directions import measure_directions

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
    progress, advance = _progress_bar(len(harmful_prompts) + len(harmless_prompts), "measuring residuals")
    with progress:
        result = measure_directions(loaded, harmful_prompts, harmless_prompts, system_prompt=system_prompt,
                                    batch_size=batch_size, projected=projected, winsorize_quantile=winsorize,
                                    progress=advance)
    result.save(output_path, also_pt=formats == "pt")
    suggested = round(0.65 * (result.n_layers - 1))
    click.echo(f"wrote {output_path}: {result.n_layers} layers x {result.hidden_size}, from {len(harmful_prompts)} harmful "
               f"and {len(harmless_prompts)} harmless prompts")
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
    from abliterate.ablation import bake, plan_edits
    from abliterate.directions import Directions
    from abliterate.export import check_output_dir, save_hf

    check_output_dir(output)
    params = _ablation_params(layer, weight, params_file, components, norm_preserving)
    refusal = Directions.load(directions_file)
    loaded = _load(model, revision, dtype, device_map, trust_remote_code)
    refusal = refusal.fitted_to(loaded.adapter)
    edits = plan_edits(loaded.adapter, refusal.directions, params)
    with _status("editing weights"):
        bake(edits, params.norm_preserving)
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


@main.command(name="run")
@click.argument("model", required=False)
@click.option("-o", "--output", default=None, help="Output directory (default: ./abliterate-<model name>). Holds the run state; "
              "running the same command again resumes.")
@click.option("--trials", type=int, default=None, help="Trials in total (default 50).")
@click.option("--startup-trials", type=int, default=None, help="Random trials before TPE (default 12).")
@click.option("--seed", type=int, default=None, help="Sampler seed (default 0).")
@click.option("--pick", default=None, help="Which trial to save without asking: auto (default), min-kl:refusals<=0.05, "
              "min-refusals:kl<=0.2, trial:17.")
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
@click.option("--print-config", is_flag=True, help="Print every setting with its default (config.default.toml) and exit.")
def run_command(model, output, config_file, print_config, **flags):
    """Search for the best ablation of MODEL (default: the bundled tiny model) and save it, measured."""
    from abliterate.config import default_toml, load_settings
    from abliterate.run import run
    from abliterate.search import check_pick_rule

    if print_config:
        click.echo(default_toml(), nl=False)
        return
    flags["trust_remote_code"] = flags["trust_remote_code"] or None  # unset unless given: env/TOML may set it
    settings = load_settings(config_file, model=model, **flags)
    check_pick_rule(settings.pick)
    if output is None:
        output = f"abliterate-{Path(settings.model.rstrip('/')).name.removesuffix('.gguf') or 'model'}"
    from abliterate.progress import RunDisplay

    display = RunDisplay(interactive=sys.stdin.isatty() and sys.stdout.isatty() and flags.get("pick") is None)
    with display:
        result = run(settings, Path(output), display)
    display.summary(result)


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

    from abliterate.evaluate import Baseline, check_same_vocabulary, choose_batch_size, evaluate, perplexity
    from abliterate.judges import get_judge
    from abliterate.prompts import format_prompts

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
            batch_size = choose_batch_size(loaded.model, loaded.tokenizer, formatted_harmful)
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
    from abliterate.prompts import BUNDLED_SETS

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

    from abliterate.judges import DEFAULT_JUDGE, labelled_set_scores

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
    from abliterate.chat import Conversation, chat_loop, read_terminal_line, write_terminal

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
    from abliterate.directions import Directions

    return Directions.load(path)


def _inference_ablation(loaded, refusal, params):
    """The ablation as reversible hooks on the loaded model (a no-op context without one)."""
    import contextlib

    from abliterate.ablation import ablate, plan_edits

    if refusal is None:
        return contextlib.nullcontext()
    edits = plan_edits(loaded.adapter, refusal.fitted_to(loaded.adapter).directions, params)
    return ablate(edits, params.norm_preserving)


if __name__ == "__main__":  # keep last: every command above is registered by then
    main()
