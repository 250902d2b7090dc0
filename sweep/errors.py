"""Errors the engine reports to the user (and the exit status the CLI gives them)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

EXIT_BAD_INPUT = 2


class SweepError(Exception):
    """Something the user can fix: a bad study file, option, path or result directory.

    The CLI prints the message alone (no traceback) and exits with status 2.
    """


class StudyError(SweepError):
    """A study file is missing, unreadable or does not validate."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None):
        where = ": ".join(part for part in (path, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.path = path
        self.key = key


# models.errors has the same function: models may not import sweep, and importing models here
# would load torch and every detector into read-only commands that only word an error.
def did_you_mean(name: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the closest option, or ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
