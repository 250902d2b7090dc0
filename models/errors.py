"""The one exception type of the ``models`` package, and the hint its messages end with."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ModelError", "did_you_mean"]


class ModelError(ValueError):
    """A detector was asked for with a bad name, hyperparameter or backbone/layer.

    The message names the detector (or backbone) and says what would work instead, so that a
    command line can print it as is; ``sweep`` maps it to exit status 2.
    """


# sweep.errors keeps a copy of this function: models may not import sweep, and sweep's
# read-only commands (query, report, compare) must not import models (torch, timm and every
# detector: 5 s) to word an error.
def did_you_mean(name: str, options: Iterable[str]) -> str:
    """'; did you mean X?' for the closest option, or ''."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
