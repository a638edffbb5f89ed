"""Exceptions that carry a one-line, user-facing message.

Every error raised for bad input names the file (or layer) and the problem, so the CLI
can print it without a traceback and the widgets can show it in a notification.
"""

from __future__ import annotations

from pathlib import Path


class LnmetaError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class SlideError(LnmetaError):
    """A slide cannot be opened or read."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ModelError(LnmetaError):
    """A model file is missing, not safetensors, or does not fit the request."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputExistsError(LnmetaError):
    """An output already exists and overwriting was not asked for."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        super().__init__(f"{self.path}: already exists (pass --overwrite / overwrite=True to replace it)")


class InputError(LnmetaError):
    """Any other bad input (empty tissue, mismatched shapes, bad CSV, ...)."""


class LnmetaWarning(UserWarning):
    """Something was repaired or left out on the way in; the CLI prints it as one line
    (``lnmeta: warning: ...``) and the widgets as a notification."""


class OutputLockedError(LnmetaError):
    """Another run is writing the same output."""

    def __init__(self, path: str | Path, holder: str):
        self.path = str(path)
        super().__init__(f"{self.path}: being written by {holder}; wait for it to finish "
                         "or choose another output")
