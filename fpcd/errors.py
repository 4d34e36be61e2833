"""The expected failures of fpcd: the errors a user can cause and fix (a bad config value, a
data file of the wrong layout, a workdir of another run, a full disk), as opposed to bugs.

Every expected error subclasses :class:`ExpectedError`; ``experiments/main.py`` prints such an
error as one line ``error: <message>`` and exits 1, and shows a traceback for anything else.
Each error keeps its historical built-in base as well (``ConfigError`` is a ``ValueError``), so
that ``except ValueError`` in a caller's code still catches it.
"""

from __future__ import annotations


class ExpectedError(Exception):
    """A failure the user can fix; its message names the problem (field, file, path)."""


class ConfigError(ExpectedError, ValueError):
    """A config value is missing or invalid; the message names the field."""


class DataError(ExpectedError, ValueError):
    """A data file or generated data set is unusable; the message names the file, dataset and row."""
