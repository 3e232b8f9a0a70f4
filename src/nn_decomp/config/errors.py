"""The error a user can fix, and the check that raises it: every schema's `__post_init__` and every
command's own checks end a CLI with one `error:` line through these."""
from typing import Any


class UsageError(Exception):
    """Bad input the user can fix; the CLIs print it as one line (jobs.exit_on_usage_error)."""


def require(ok: Any, message: str) -> None:
    """A check on user input: unlike an assert it survives `python -O`, and it ends a CLI with one line."""
    if not ok:
        raise UsageError(message)
