"""What the commands print: rich tables and summary lines (presentation only; the numbers come from the stages)."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from abliterate.choose.catalog import format_bytes, format_count
from abliterate.choose.compare import TABLE_COLUMNS, lm_eval_deltas, table_rows
from abliterate.core.judges import DEFAULT_JUDGE


def status(message: str):
    """A spinner on stderr while `message` is being done."""
    return Console(stderr=True).status(message)


def print_metrics(data: dict) -> None:
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


def print_judges(scores: dict) -> None:
    table = Table(title=f"refusal judges on {next(iter(scores.values()))['n']} labelled responses")
    for column in ("judge", "precision", "recall", "F1"):
        table.add_column(column)
    for name, score in scores.items():
        label = f"{name} (default)" if name == DEFAULT_JUDGE else name
        table.add_row(label, f"{score['precision']:.2f}", f"{score['recall']:.2f}", f"{score['f1']:.2f}")
    Console().print(table)


def print_catalog(result: dict, memory: str | None, vram: str | None) -> None:
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


def print_estimate(result: dict, source, batch: int) -> None:
    fmt = result["format"]
    if fmt == "as stored" and source.config.get("gguf_file_type"):
        fmt = f"{source.config['gguf_file_type']} (as stored)"
    table = Table(title=f"{result['model']}: {result['model_type']}, {format_count(result['parameters'])} parameters, "
                        f"{fmt} ({result['bits_per_weight']:.2f} bits/weight), {result['context']} tokens x {batch}")
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


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def print_upload_plan(uploads, repo_id: str, private: bool) -> None:
    click.echo(f"would {'create (private) or update' if private else 'create or update'} "
               f"https://huggingface.co/{repo_id} with one commit of {len(uploads)} files "
               f"({megabytes(sum(u.size() for u in uploads))}):")
    for upload in uploads:
        origin = "generated" if isinstance(upload.source, bytes) else str(upload.source)
        click.echo(f"  {upload.path_in_repo:<40} {megabytes(upload.size()):>9}  {origin}")


def print_comparison(comparison, written: dict) -> None:
    table = Table(title=f"against {comparison.base_label}: {comparison.settings['prompt_counts']['harmful']} held-out "
                        f"harmful prompts, judge {comparison.settings['judge']}")
    for column in TABLE_COLUMNS:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in table_rows(comparison):
        table.add_row(*row)
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped or logged: no truncated columns
    for label, tasks in lm_eval_deltas(comparison.results, comparison.base_label).items():
        shown = ", ".join(f"{task} {metric} {value:+.4f}" for task, metrics in tasks.items() for metric, value in metrics.items())
        click.echo(f"lm-eval {label} − base: {shown or 'n/a'}")
    click.echo(f"wrote {written['report']} and {written['results']}")
    if "sheet" in written:
        click.echo(f"blind sheet: {written['sheet']} (rate in {written['ratings']}; the key is {written['key']}: don't open it "
                   f"first), then: abliterate compare reveal {written['sheet']} {written['ratings']}")


def print_reveal(result: dict) -> None:
    kinds = sorted({kind for m in result["models"] for kind in m["by_kind"]})
    table = Table(title=f"{result['rated']} of {result['answers']} answers rated")
    for column in ("model", "mean rating", "ratings", *kinds):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in result["models"]:
        table.add_row(m["model"], "n/a" if m["mean"] is None else f"{m['mean']:.2f}", str(m["ratings"]),
                      *("n/a" if kind not in m["by_kind"] else f"{m['by_kind'][kind]:.2f}" for kind in kinds))
    Console().print(table)


def print_verification(result) -> None:
    click.echo(f"verify {result.model} against {result.base} ({result.numbers['asked']} held-out harmful prompts, "
               f"the base refuses {result.numbers['base_refused']}; judge {result.numbers['judge']})")
    for check in result.checks:
        click.echo(f"{'PASS' if check.passed else 'FAIL'}  {check.summary}")
        for line in check.details:
            click.echo(f"        {line}")
    passed = sum(c.passed for c in result.checks)
    click.echo(f"{'verified' if result.passed else 'not verified'}: {passed}/{len(result.checks)} checks pass")


def print_ollama_export(result, name: str, system: str | None) -> None:
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
