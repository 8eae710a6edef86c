"""The one exception type users see: what is wrong and what to do, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input or environment. The CLI prints `error: <message>` and exits with code 2."""

    exit_code = 2
