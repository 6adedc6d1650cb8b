"""The errors a user can act on, and the exit code each one means.

Every command shares one error path (`cli.main`): an `OrpoDistillError` is printed as one line that names the file,
key or value at fault and what to do, with its `exit_code`, and without a traceback (unless `--debug`). Anything
else is a bug in orpo-distill and keeps its traceback. Modules raise the most specific class below; existing error
types of the stages (`ConfigError`, `TaskDataError`, `MissingTraces`, ...) derive from these.
"""

from __future__ import annotations


class OrpoDistillError(Exception):
    """Base class: a failure whose message is meant for the user (no traceback needed)."""

    exit_code = 1


class UserError(OrpoDistillError, ValueError):
    """Bad input the user can fix: a config, a data file, a model path, a command-line value, a store (exit 2)."""

    exit_code = 2


class EndpointError(OrpoDistillError):
    """A sampling endpoint (API, server) could not be reached or answered nothing usable (exit 3). Whatever was
    obtained before the failure is kept; the same command resumes."""

    exit_code = 3


class TrainingDiverged(OrpoDistillError):
    """A loss or gradient norm became NaN/inf; the variant was stopped before any non-finite weights were written
    (exit 4). Lower the learning rate (or enable gradient clipping) and re-run: it resumes from the last finite
    checkpoint."""

    exit_code = 4


__all__ = ["EndpointError", "OrpoDistillError", "TrainingDiverged", "UserError"]
