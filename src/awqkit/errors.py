"""awqkit's expected failures: one exception family, so callers and the CLI can tell them from bugs.

Every class here is a :class:`AwqkitError` and also subclasses the builtin a caller would catch for the
same problem (``ValueError`` for bad values, ``FileExistsError`` for a destination that is in the way), so
code written against the builtins keeps working. Messages name what failed, where, and the fix, in one
line. The ``awqkit`` command prints them as ``awqkit <command>: error: <message>`` with exit status 2 (a
traceback only with ``-v``); ``docs/errors.md`` catalogues them.

Nothing here imports torch: the module is safe to import anywhere, first.
"""

from __future__ import annotations


class AwqkitError(Exception):
    """Base of awqkit's expected failures (bad input, unsafe destination, malformed checkpoint, ...)."""


class InputError(AwqkitError, ValueError):
    """An argument, file or setting the user gave is wrong (the message says which and how to fix it)."""


class DestinationError(AwqkitError, FileExistsError):
    """The output destination cannot be used: it exists, is not awqkit's, or would destroy user data."""


class CheckpointError(AwqkitError, ValueError):
    """A model folder or checkpoint is malformed: truncated files, wrong dtypes or shapes, missing fields."""


class NonFiniteError(AwqkitError, ValueError):
    """A tensor or a metric holds NaN or Inf (the message names it)."""


class KernelInputError(AwqkitError, ValueError):
    """A native kernel was called with a shape, stride, dtype or device it cannot take."""


class EnvironmentProblem(AwqkitError, RuntimeError):
    """The machine cannot do what was asked: a device that is absent, too little disk space, no write access."""


__all__ = [
    "AwqkitError",
    "CheckpointError",
    "DestinationError",
    "EnvironmentProblem",
    "InputError",
    "KernelInputError",
    "NonFiniteError",
]
