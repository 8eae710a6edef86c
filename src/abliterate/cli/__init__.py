"""The command line: options and calls over the stages, and the live display of a run."""

from abliterate.cli.commands import main

__all__ = ["main"]
