"""Exception types that the command line maps to exit codes.

Exit code 2 covers invalid usage or input; exit codes 1 and 3 come from gate outcomes, not from
exceptions (see :mod:`stabcheck.gates`).
"""

from __future__ import annotations


class StabcheckError(Exception):
    """Base class for errors that stop an analysis with a message for the user."""

    exit_code = 2


class UsageError(StabcheckError):
    """An option or configuration value is invalid."""


class CheckpointError(StabcheckError):
    """A checkpoint cannot be read, is unsafe to read, or does not match the model."""


class SpecError(StabcheckError):
    """A model, data or loss spec cannot be imported, called, or returned the wrong type."""


class DataError(StabcheckError):
    """The analysis data is empty, malformed, or inconsistent with the model."""


class AnalyzerFailed(StabcheckError):
    """An analyzer raised while the analysis was split over several processes.

    The run stops with exit code 3 (inconclusive), because the other processes cannot finish
    the analyzer without this process's share of the examples.
    """

    exit_code = 3
    # Only this process met the error, so it prints the message itself.
    rank_specific = True
