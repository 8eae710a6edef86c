"""The `abliterate` command line: options and calls into the stages. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from abliterate.choose import compare as comparing
from abliterate.choose import verify as verifying
from abliterate.choose.catalog import estimate, parse_memory, read_model_config, select
from abliterate.choose.evaluation import evaluate_model, read_prompt_sets
from abliterate.choose.report import run_report, write_html
from abliterate.cli.options import (DEFAULT_MODEL, ablation_options, ablation_params, comma_list, model_options,
                                    prompt_options, schema_options)
from abliterate.cli import serving, tables
from abliterate.cli.tables import status
from abliterate.cli.progress import RunDisplay
from abliterate.core.judges import get_judge, labelled_set_scores
from abliterate.core.load import load_model
from abliterate.core.rundir import stored_settings
from abliterate.core.settings import (APPLY_DTYPE, CHAT_MAX_NEW_TOKENS, DIRECTIONS_BATCH_SIZE, CompareSettings,
                                      MeasureSettings, PromptSettings, RunSettings, VerifySettings, default_toml, load_settings,
                                      settings_from_options)
from abliterate.errors import UserError
from abliterate.measure.directions import Directions
from abliterate.measure.engines import engine_name, opened_engine
from abliterate.measure.inference import inference_ablation
from abliterate.measure.prompt_directions import FILTER_NEW_TOKENS, directions_from_prompts
from abliterate.search.run import check_exports, run, ship
from abliterate.search.study import check_pick_rule
from abliterate.ship import publish
from abliterate.ship.apply import apply_gguf_streaming, apply_shard_wise, apply_to_gguf, apply_to_hf
from abliterate.core.save import check_output_dir
from abliterate.ship.gguf_check import check_gguf
from abliterate.ship.gguf_export import check_quant, convert
from abliterate.ship.ollama import export_ollama
from abliterate.use.chat import Conversation, chat_loop, read_terminal_line, write_terminal


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


def _load(model, revision, dtype, device_map, trust_remote_code, engine: str | None = None, **loading):
    """`loading`: quantize, max_memory, offload_folder (see load_model); `engine` is named in the status line."""
    with status(f"loading {model}" + (f" (engine: {engine})" if engine else "")):
        return load_model(model, dtype=dtype, device_map=device_map, revision=revision,
                          trust_remote_code=trust_remote_code, **loading)


def _progress_bar(total: int):

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("ETA"), TimeRemainingColumn(), transient=True, console=Console(stderr=True))
    task = progress.add_task("measuring residuals", total=total)
    return progress, (lambda n: progress.advance(task, n))


def _stderr(line: str) -> None:
    click.echo(line, err=True)


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
@click.option("--projected/--no-projected", default=RunSettings.model_fields["projected"].default, show_default=True,
              help="Remove each direction's component along the harmless mean (as `run` does by default).")
@click.option("--winsorize", type=float, default=None,
              help="Clamp each residual at this quantile of |h| before averaging (`run` uses 0.99; default: no clamping).")
@click.option("--refused-only", is_flag=True,
              help=f"Only the harmful prompts the model refuses (judged at {FILTER_NEW_TOKENS} new tokens; as `run` does by "
                   "default; all of them when it refuses fewer than 8).")
@click.option("--format", "formats", type=click.Choice(["safetensors", "pt"]), default="safetensors", show_default=True,
              help="'pt' also writes a plain [layers, hidden] tensor .pt beside the safetensors.")
@click.option("--batch-size", type=int, default=DIRECTIONS_BATCH_SIZE, show_default=True)
def directions(model, revision, dtype, device_map, trust_remote_code, harmful, harmless, column, split, system_prompt,
               output, limit, projected, winsorize, refused_only, formats, batch_size, **loading):
    """Measure per-layer refusal directions from harmful vs harmless prompts."""
    output_path = Path(output)
    if not output_path.parent.exists():
        raise UserError(f"directory {output_path.parent} does not exist; create it or choose another -o")
    if batch_size <= 0 or (limit is not None and limit <= 0):
        raise UserError("--batch-size must be positive" if batch_size <= 0 else "--limit must be positive")
    harmful_prompts, harmless_prompts = read_prompt_sets(harmful, harmless, column, split)
    harmful_prompts, harmless_prompts = harmful_prompts[:limit], harmless_prompts[:limit]
    loaded = _load(model, revision, dtype, device_map, trust_remote_code, **loading)
    result, used = directions_from_prompts(loaded, harmful_prompts, harmless_prompts, system_prompt=system_prompt,
                                           batch_size=batch_size, projected=projected, winsorize=winsorize,
                                           refused_only=refused_only, note=_stderr, progress_bar=_progress_bar)
    result.save(output_path, also_pt=formats == "pt")
    click.echo(f"wrote {output_path}: {result.n_layers} layers x {result.hidden_size}, from {used} harmful "
               f"(of {len(harmful_prompts)}) and {len(harmless_prompts)} harmless prompts")
    click.echo(f"next: abliterate apply {model} --directions {output_path} --layer {round(0.65 * (result.n_layers - 1))} "
               "-o OUT_DIR (directions from 55-75% depth usually work best)")


@main.command()
@model_options(defaults={"dtype": APPLY_DTYPE})
@click.option("--directions", "directions_file", required=True, help="Directions file (.safetensors, or .pt of other tools).")
@ablation_options
@click.option("-o", "--output", "output", required=True, help="Output directory (a complete HF model).")
def apply(model, revision, dtype, device_map, trust_remote_code, directions_file, layer, weight, params_file, components,
          norm_preserving, output, **loading):
    """Bake an ablation into the weights and save a complete HF model."""
    gguf_out = output.lower().endswith(".gguf")
    if gguf_out:
        if not model.lower().endswith(".gguf"):
            raise UserError("-o FILE.gguf needs a .gguf MODEL (GGUF in, GGUF out); "
                            "for an HF model, apply to a directory and use `abliterate export gguf`")
        if Path(output).exists():
            raise UserError(f"output {output} already exists; choose another -o or remove it")
        dtype = "float32" if dtype == APPLY_DTYPE else dtype  # edit the dequantised weights at full precision
    else:
        check_output_dir(output)
    if loading.get("quantize", "none") != "none":
        raise UserError("apply bakes full-precision weights; drop --quantize (it is for measuring and searching)")
    params = ablation_params(layer, weight, params_file, components, norm_preserving)
    refusal = Directions.load(directions_file)
    if gguf_out and dtype == "float32" and (report := apply_gguf_streaming(model, trust_remote_code, refusal, params, output, status,
                                                    _stderr)) is not None:
        return _wrote_gguf(output, report)
    if not gguf_out and (plan := apply_shard_wise(model, revision, dtype, trust_remote_code, refusal, params, output,
                                                  directions_file, status, _stderr)) is not None:
        click.echo(f"wrote {output}: {plan.edit_count} component edits baked into {plan.model_type} weights, shard by shard")
        return
    loaded = _load(model, revision, dtype, device_map, trust_remote_code, **loading)
    if any(parameter.device.type == "meta" for parameter in loaded.model.parameters()):
        raise UserError("--max-memory offloaded weights to disk, where a bake cannot edit them; use --dtype checkpoint "
                        "on a safetensors checkpoint (baked shard by shard in about one tensor's memory)")
    if not gguf_out:
        edits = apply_to_hf(loaded, refusal, params, output, directions_file, status)
        click.echo(f"wrote {output}: {edits} component edits baked into {loaded.adapter.model_type} weights")
        return
    _wrote_gguf(output, apply_to_gguf(loaded, refusal, params, output, status))


def _wrote_gguf(output: str, report) -> None:
    retyped = sorted({f"{a}→{b}" for a, b in report.retyped.values()})
    click.echo(f"wrote {output}: {report.tensors_edited} tensors re-encoded, every other tensor and all metadata "
               f"copied" + (f"; re-encoded as the nearest type the gguf library writes: {', '.join(retyped)}"
                            if retyped else ""))


def _default_run_output(name: str | None, model: str) -> str:
    return f"abliterate-{name or Path(model.rstrip('/')).name.removesuffix('.gguf') or 'model'}"


def _run_settings(model, output, config_file, resume, export_targets, flags) -> tuple[RunSettings, str]:
    """The run's settings from every source, and its output directory."""
    flags["trust_remote_code"] = flags["trust_remote_code"] or None  # unset unless given: env/TOML may set it
    given = {key: value for key, value in {"model": model, "export": comma_list(export_targets), **flags}.items()
             if value is not None}
    if resume:
        output = output or _default_run_output(given.get("name"), given.get("model", DEFAULT_MODEL))
        given = {**stored_settings(Path(output)), **given}  # what defines the run comes from the run itself
    settings = load_settings(config_file, **given)
    check_pick_rule(settings.pick)
    check_exports(settings)
    return settings, output or _default_run_output(settings.name, settings.model)


@main.command(name="run")
@click.argument("model", required=False)
@click.option("-o", "--output", default=None, help="Output directory (default: ./abliterate-<model name>). Holds the run state; "
              "running the same command again resumes.")
@schema_options(RunSettings, "trials", "startup_trials", "seed", "pick", unset=True)
@click.option("--config", "config_file", default=None, help="TOML settings file (default ./config.toml if present).")
@schema_options(RunSettings, "harmful", "harmless", "column", "tune_prompts", "eval_prompts", "max_new_tokens", "judge",
                "engine", "tensor_parallel", "dtype", "device_map", "quantize", "max_memory", "offload_folder", "revision", "trust_remote_code",
                "name", unset=True)
@click.option("--export", "export_targets", default=None, help="After saving, also export: gguf, ollama (comma list).")
@schema_options(RunSettings, "quant", unset=True)
@click.option("--resume", is_flag=True, help="Continue the run in OUT_DIR with the settings it was started with "
              "(flags given now may change trials, pick, seed; the same command without --resume also continues).")
@click.option("--print-config", is_flag=True, help="Print every setting with its default (config.default.toml) and exit.")
def run_command(model, output, config_file, print_config, export_targets, resume, **flags):
    """Search for the best ablation of MODEL (default: the bundled tiny model) and save it, measured."""
    if print_config:
        click.echo(default_toml(), nl=False)
        return
    settings, output = _run_settings(model, output, config_file, resume, export_targets, flags)
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
        _upload(output, display.upload_repo)


def _upload(output: str, repo: str) -> None:
    """The upload the interactive choice asked for, after the model is saved."""
    try:
        url, _ = publish.push(output, repo, status=_stderr)
    except UserError as error:
        raise UserError(f"saved in {output}, not uploaded: {error}; then `abliterate push {output} --repo {repo}`") from None
    click.echo(f"uploaded: {url}")


@main.command(name="eval")
@model_options
@click.option("--base", default=None,
              help="Base model for KL. Default: the base_model recorded in MODEL/abliteration.json, if any.")
@schema_options(PromptSettings, "harmful", "harmless", "column")
@click.option("--split", default=None, help="train/tune/eval (default: eval for the bundled sets, every prompt of a file).")
@click.option("--limit", type=int, default=None, help="At most this many prompts of each set.")
@schema_options(MeasureSettings, "max_new_tokens", "kl_tokens", "judge", "engine", "tensor_parallel", "system_prompt")
@click.option("--perplexity", "perplexity_file", default=None, help="Also report perplexity on this UTF-8 text file.")
@schema_options(MeasureSettings, "batch_size")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_command(base, harmful, harmless, column, split, limit, perplexity_file, as_json, **measuring):
    """Measure refusals (held-out split by default) and KL against the base model."""
    settings = settings_from_options(MeasureSettings, **measuring)
    metrics = evaluate_model(settings, base=base, harmful=harmful, harmless=harmless, column=column, split=split,
                             limit=limit, perplexity_file=perplexity_file, status=status)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    tables.print_metrics(metrics)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def judges(as_json):
    """Precision and recall of each refusal judge on the bundled labelled set of real responses."""
    with status("judging the labelled set"):
        scores = labelled_set_scores()
    if as_json:
        click.echo(json.dumps(scores))
        return
    tables.print_judges(scores)


# --- chat ---


def _inference_setup(directions_file, layer, weight, params_file, components, norm_preserving):
    """The directions and parameters of an ablation at inference time (None, None without --directions)."""
    if (layer is not None or params_file is not None) and not directions_file:
        raise UserError("--layer/--params ablate at inference time and need --directions FILE")
    if not directions_file:
        return None, None
    params = ablation_params(layer, weight, params_file, components, norm_preserving)
    return Directions.load(directions_file), params


@main.command()
@model_options
@click.option("--directions", "directions_file", default=None,
              help="Ablate at inference time (nothing saved): this directions file, with --layer or --params.")
@ablation_options
@click.option("--system", "system_prompt", default=None, help="System prompt.")
@click.option("--max-new-tokens", type=int, default=CHAT_MAX_NEW_TOKENS, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@schema_options(MeasureSettings, "engine", "tensor_parallel")
def chat(model, revision, dtype, device_map, trust_remote_code, directions_file, layer, weight, params_file, components,
         norm_preserving, system_prompt, max_new_tokens, temperature, engine, tensor_parallel, **loading):
    """Chat with MODEL in the terminal: a saved model, a .gguf, or a base model ablated on the fly."""
    if max_new_tokens <= 0 or temperature < 0:
        raise UserError("--max-new-tokens must be positive and --temperature not negative")
    refusal, params = _inference_setup(directions_file, layer, weight, params_file, components, norm_preserving)
    engine = engine_name(engine, tensor_parallel)  # a missing engine package: one line, before loading
    loaded = _load(model, revision, dtype, device_map, trust_remote_code, engine=engine, **loading)
    with opened_engine(loaded, engine, tensor_parallel) as runner, inference_ablation(runner, loaded, refusal, params):
        chat_loop(runner, read_terminal_line, write_terminal, Conversation(system_prompt), max_new_tokens, temperature)


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
    result = select(memory=parse_memory(memory) if memory else None, vram=parse_memory(vram) if vram else None,
                    use=use, context=context)
    if as_json:
        click.echo(json.dumps(result))
        return
    tables.print_catalog(result, memory, vram)


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
    source = read_model_config(model, revision)
    result = estimate(source.config, dtype=dtype, quant=quant, context=context, batch=batch,
                      stored_weights_bytes=source.weights_bytes, stored_parameters=source.parameters)
    result = {"model": model, "source": source.source, **result}
    if as_json:
        click.echo(json.dumps(result))
        return
    tables.print_estimate(result, source, batch)


# --- push ---


@main.command()
@click.argument("out_dir")
@click.option("--repo", "repo_id", required=True, help="Hub repository to create or update: user/name.")
@click.option("--private", is_flag=True, help="Create the repository private (refused if it exists and is public).")
@click.option("--dry-run", is_flag=True, help="Print the files the commit would hold and stop (no token, no network).")
def push(out_dir, repo_id, private, dry_run):
    """Publish OUT_DIR (a saved model) to the Hugging Face Hub in one commit: weights, card, record, reproduce/.

    The token comes from HF_TOKEN or `hf auth login`; it is never written anywhere."""
    publish.check_repo_id(repo_id)
    if dry_run:
        tables.print_upload_plan(publish.plan_upload(out_dir, repo_id), repo_id, private)
        return
    url, uploads = publish.push(out_dir, repo_id, private=private, status=_stderr)
    click.echo(f"pushed {len(uploads)} files ({tables.megabytes(sum(u.size() for u in uploads))}) to {url}")


# --- export ---


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
    result = export_ollama(model_or_gguf, name, template_file=template_file, system=system, out_dir=out_dir,
                           create=not no_create)
    tables.print_ollama_export(result, name, system)


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
    quant = check_quant(quant)
    source = Path(model_dir)
    if not source.is_dir():
        raise UserError(f"{model_dir} is not a directory; give a saved HF model directory (config.json + safetensors)")
    output = Path(output) if output else source.parent / f"{source.resolve().name}-{quant}.gguf"
    with status(f"converting {source} to {output.name}"):
        convert(source, output, quant)
    click.echo(f"wrote {output} ({output.stat().st_size / 2**20:.0f} MiB, {quant})")
    if not verify:
        return
    with status("checking the GGUF in llama.cpp against the HF model"):
        agreement = check_gguf(source, output, verify_prompts, verify_tokens)
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
@schema_options(MeasureSettings, "engine", "tensor_parallel")
def serve(model, revision, dtype, device_map, trust_remote_code, directions_file, layer, weight, params_file, components,
          norm_preserving, host, port, api_key, name, max_tokens_limit, max_queue, engine, tensor_parallel, **loading):
    """Serve MODEL over HTTP: OpenAI-compatible /v1 (chat/completions, completions, models) and Ollama-compatible /api
    (chat, generate, tags). MODEL: a saved model, a .gguf, or a base model ablated on the fly (--directions with --layer
    or --params). One generation at a time; other requests wait their turn."""
    if max_tokens_limit <= 0 or max_queue < 0:
        raise UserError("--max-tokens-limit must be positive and --max-queue not negative")
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535; got {port}")
    refusal, params = _inference_setup(directions_file, layer, weight, params_file, components, norm_preserving)
    uvicorn, create_app = serving.server_modules()
    engine = engine_name(engine, tensor_parallel)
    listening = serving.listen(host, port)  # before loading: a port in use is told at once, and no one can take it meanwhile
    try:
        if not api_key and host not in serving.LOCAL_HOSTS:
            _stderr(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model")
        loaded = _load(model, revision, dtype, device_map, trust_remote_code, engine=engine, **loading)
        name = name or Path(model.rstrip("/")).name.removesuffix(".gguf") or "model"
        with opened_engine(loaded, engine, tensor_parallel) as runner, inference_ablation(runner, loaded, refusal, params):
            app = create_app(runner, name, api_key=api_key, max_tokens_limit=max_tokens_limit, max_queue=max_queue)
            serving.serve_on(listening, app, uvicorn, name, host, port, api_key)
    finally:
        listening.close()


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
@schema_options(CompareSettings, "limit", "max_new_tokens", "probe_tokens", "probes", "paraphrase_groups", "kl_tokens",
                "judge", "engine", "tensor_parallel", "system_prompt", "batch_size", "directions", "direction_prompts", "sheet_prompts", "seed",
                "lm_eval_tasks", "lm_eval_limit", "dtype", "device_map", "quantize", "max_memory", "offload_folder",
                "trust_remote_code",
                flags={"paraphrase_groups": "--paraphrases", "lm_eval_tasks": "--lm-eval"})
@click.option("--json", "as_json", is_flag=True, help="Print the results (without answers) as one JSON object on stdout.")
def compare_models(models, base, output, as_json, **options):
    """Compare MODEL_A MODEL_B ... (see `abliterate compare --help`)."""
    options["lm_eval_tasks"] = comma_list(options["lm_eval_tasks"]) or []
    settings = settings_from_options(CompareSettings, **options)
    comparing.plan_models(list(models), base)  # bad model specs fail before anything is loaded
    get_judge(settings.judge)
    if settings.directions and not Path(settings.directions).is_file():
        raise UserError(f"directions file not found: {settings.directions}")
    comparing.check_output_dir(Path(output))
    comparison = comparing.compare(list(models), base, settings, status=_stderr)
    written = comparing.write_outputs(comparison, Path(output), comparing.read_prompt_sets(settings))
    if comparison.lm_eval_note:
        _stderr(comparison.lm_eval_note)
    if as_json:
        click.echo(json.dumps(comparison.to_dict(answers=False)))
        return
    tables.print_comparison(comparison, written)


@compare.command(name="reveal")
@click.argument("sheet")
@click.argument("ratings")
@click.option("--key", "key_file", default=None, help="The key (default: key.json beside SHEET).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def compare_reveal(sheet, ratings, key_file, as_json):
    """Join a reader's RATINGS of a blind SHEET (sheet.md or its directory) with its key: mean rating per model.

    RATINGS: the sheet's ratings.csv filled in (prompt_id, letter, rating), or JSON ([{prompt_id, letter, rating}] or
    {prompt_id: {letter: rating}}). Blank ratings are skipped."""
    key, warnings = comparing.read_key(sheet, key_file)
    for warning in warnings:
        _stderr(f"warning: {warning}")
    result = comparing.reveal(key, comparing.read_ratings(ratings), str(ratings))
    if as_json:
        click.echo(json.dumps(result))
        return
    tables.print_reveal(result)


@main.command()
@click.argument("model", default=DEFAULT_MODEL, required=False)
@click.option("--base", default=None, help="The model it was made from. Default: base_model in MODEL/abliteration.json "
              "(or BASE of a BASE::DIRECTIONS::PARAMS variant).")
@schema_options(VerifySettings, "prompts", "max_new_tokens", "reasoning_probes", "reasoning_tokens", "kl_prompts",
                "kl_tokens", "judge", "engine", "tensor_parallel", "min_answered", "on_topic", "reasoning_slack", "max_kl", "max_kl_multi",
                "system_prompt", "batch_size", "dtype", "device_map", "quantize", "max_memory", "offload_folder",
                "trust_remote_code")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def verify(model, base, as_json, **options):
    """Check an abliterated MODEL against its base: formerly refused prompts answered on topic, step-by-step reasoning
    intact, benign answers close to the base (KL). Exit 0: all pass; 1: a check fails; 2: bad input.

    MODEL: a saved directory, a .gguf, a hub id, or BASE::DIRECTIONS::PARAMS (an ablation applied in memory)."""
    result = verifying.verify(model, base, settings_from_options(VerifySettings, **options), status=_stderr)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        tables.print_verification(result)
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("run_dir")
@click.option("-o", "--output", default=None, help="HTML file to write (default: RUN_DIR/report.html).")
def report(run_dir, output):
    """Render a finished or running `abliterate run` directory as an offline HTML report: Pareto front, trials over
    time, parameter importance, per-layer direction strength, the chosen trial's layer weights."""
    target = Path(output) if output else Path(run_dir) / "report.html"
    if output and not target.parent.exists():
        raise UserError(f"directory {target.parent} does not exist; create it or choose another -o")
    with status(f"rendering {run_dir}"):
        document = run_report(run_dir)
    write_html(target, document)
    click.echo(f"wrote {target}")


if __name__ == "__main__":  # keep last: every command above is registered by then
    main()
