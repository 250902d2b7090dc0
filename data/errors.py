"""The one exception type of the ``data`` package."""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(ValueError):
    """Bad data or a bad data argument: a missing directory, an unreadable image, a mask that
    does not fit its image, an unknown option.

    The message names the offending path (or argument) and says what was expected, so that a
    command line can print it as is; ``sweep`` maps it to exit status 2.
    """
