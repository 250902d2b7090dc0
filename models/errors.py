"""The one exception type of the ``models`` package."""

from __future__ import annotations

__all__ = ["ModelError"]


class ModelError(ValueError):
    """A detector was asked for with a bad name, hyperparameter or backbone/layer.

    The message names the detector (or backbone) and says what would work instead, so that a
    command line can print it as is; ``sweep`` maps it to exit status 2.
    """
