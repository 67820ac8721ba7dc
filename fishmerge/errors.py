"""One error hierarchy for everything fishmerge refuses to do.

Every message names the problem and the fix in one line, so the command line can print it as is and exit
non-zero. Code that catches :class:`FishmergeError` knows nothing was half-written: operators validate their
inputs before they create any output.
"""

from __future__ import annotations


class FishmergeError(Exception):
    """Base class: a refusal with a one-line message that says what to do."""


class ConfigError(FishmergeError, ValueError):
    """A recipe, run config or command-line value is invalid (unknown key, wrong type, out of range)."""


class CheckpointError(FishmergeError):
    """A model or adapter folder is missing, not a checkpoint, corrupt, or refused (pickle, remote code)."""


class IncompatibleCheckpointsError(CheckpointError):
    """Checkpoints to be merged disagree on parameter names or shapes."""


class FisherError(FishmergeError):
    """A Fisher folder is missing, does not match its model, or holds NaN, Inf or negative values."""


class DataError(FishmergeError):
    """A dataset is missing, empty, or lacks the requested column."""


class OutputError(FishmergeError):
    """An output folder would overwrite an input or an existing result."""


class HubError(FishmergeError):
    """Publishing to the Hugging Face Hub failed; the local folder is untouched and pushing again is safe."""


def one_line(text: str) -> str:
    """Collapse a multi-line message (from a library) into one line."""
    return " ".join(str(text).split())
