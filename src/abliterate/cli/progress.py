"""What `abliterate run` shows: progress with ETA and the best trial so far, the Pareto front, the choice."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from abliterate.errors import UserError
from abliterate.search.run import Hooks
from abliterate.search.study import advice, pareto_front, pick_trial, quality_band


def _describe(trial, total: int) -> tuple[str, str]:
    refusals, kl = trial.values
    return f"{int(refusals)}/{total} refusals, KL {kl:.3f}", quality_band(refusals / total, kl)


class RunDisplay(Hooks):
    def __init__(self, interactive: bool = False):
        self.console = Console(stderr=True)
        self.interactive = interactive
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[best]}"),
                                 console=self.console, transient=False)
        self.task = None
        self.best_history: list[float] = []
        self.upload_repo: str | None = None  # chosen interactively: push the saved model to this Hub repository

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def status(self, message: str) -> None:
        self.console.print(f"[dim]{message}[/dim]")

    def trial_done(self, study, trial, done: int, total: int) -> None:
        n = int(study.user_attrs["tune_prompts"])
        if self.task is None:
            self.task = self.progress.add_task("trials", total=total, completed=done - 1, best="")
        self.progress.update(self.task, total=total)
        if "refusals_at_least" in trial.user_attrs:
            line = (f"trial {trial.number}: cut short at {trial.user_attrs['refusals_at_least']}/{n} refusals "
                    f"(KL {trial.values[1]:.3f}: a finished trial already does as well at a lower KL)")
        elif trial.user_attrs.get("cut_short"):
            line = f"trial {trial.number}: cut short (KL {trial.values[1]:.3f} cannot reach the front)"
        else:
            text, band = _describe(trial, n)
            line = f"trial {trial.number}: {text} ({band})"
        self.progress.console.print(line)
        best = self._best(study, n)
        self.progress.update(self.task, completed=done, best=best)

    def _best(self, study, total: int) -> str:
        try:
            best = pick_trial(study, "auto", total)
        except UserError:
            return ""
        refusals, kl = best.values
        score = refusals / total + kl
        trend = "" if not self.best_history else ("improving" if score < self.best_history[-1] - 1e-9 else "steady")
        self.best_history.append(score)
        return f"best #{best.number}: {int(refusals)}/{total}, KL {kl:.3f} {quality_band(refusals / total, kl)} {trend}"

    def front_table(self, study, total: int, chosen=None, limit: int | None = None) -> Table:
        recommended = pick_trial(study, "auto", total)
        table = Table(title="Pareto front (tune split)")
        for column in ("", "trial", "refusals", "KL", "rating"):
            table.add_column(column)
        front = pareto_front(study)
        for trial in front[:limit] if limit else front:
            text_refusals = f"{int(trial.values[0])}/{total}"
            mark = "*" if trial.number == recommended.number else ""
            if chosen is not None and trial.number == chosen.number:
                mark += ">"
            table.add_row(mark, str(trial.number), text_refusals, f"{trial.values[1]:.3f}",
                          quality_band(trial.values[0] / total, trial.values[1]))
        return table

    def choose(self, study, total: int):
        if not self.interactive:
            return None
        self.progress.stop()
        self.console.print(self.front_table(study, total))
        recommended = pick_trial(study, "auto", total)
        numbers = {t.number: t for t in pareto_front(study)}
        number = click.prompt("Trial to use (* is recommended)", default=recommended.number, type=click.Choice(
            [str(n) for n in numbers]), show_choices=False, value_proc=int, err=True)
        action = click.prompt("[s]ave, [u]pload to the Hub (saved first), [c]hat with it, [m]ore trials, [q]uit",
                              default="s", type=click.Choice(["s", "u", "c", "m", "q"]), err=True)
        if action == "u":
            from abliterate.ship.publish import check_repo_id

            self.upload_repo = click.prompt("Hub repository (user/name)", value_proc=_checked(check_repo_id), err=True)
            return numbers[number], "save"
        if action == "m":
            more = click.prompt("How many more trials", default=10, type=click.IntRange(1), err=True)
            self.progress.start()
            return numbers[number], ("more", more)
        return numbers[number], {"s": "save", "c": "chat", "q": "quit"}[action]

    def chat(self, engine) -> None:
        from abliterate.use.chat import chat_loop, read_terminal_line, write_terminal

        self.console.print("[dim]chatting with the chosen trial's model (ablation applied in memory); exit returns here[/dim]")
        chat_loop(engine, read_terminal_line, write_terminal, max_new_tokens=256)

    def summary(self, result) -> None:
        total = result.base["tune"]["total"]
        out = Console()
        out.print(self.front_table(result.study, total, limit=5))
        table = Table(title=f"trial {result.trial_number} saved to {result.output}")
        for column in ("split", "base refusals", "refusals", "KL", "multi-token KL", "rating"):
            table.add_column(column)
        for split in ("tune", "eval"):
            base, edited = result.base[split], result.abliterated[split]
            rate = edited["refusals"] / max(edited["total"], 1)
            table.add_row(split + (" (held out)" if split == "eval" else ""), f"{base['refusals']}/{base['total']}",
                          f"{edited['refusals']}/{edited['total']}", f"{edited['kl']:.3f}",
                          "n/a" if edited["kl_multi_token"] is None else f"{edited['kl_multi_token']:.3f}",
                          quality_band(rate, edited["kl"]))
        out.print(table)
        held_out = result.abliterated["eval"]
        for tip in advice(held_out["refusals"] / max(held_out["total"], 1), held_out["kl"], held_out["degenerate"]):
            out.print(f"tip: {tip}")
        out.print(f"next: abliterate eval {result.output}", soft_wrap=True)


def _checked(check):
    """A click value_proc from a checker that raises UserError: the prompt asks again, saying why."""
    from abliterate.errors import UserError

    def process(value: str) -> str:
        try:
            check(value)
        except UserError as error:
            raise click.UsageError(str(error)) from None
        return value

    return process
