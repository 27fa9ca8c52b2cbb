"""User-facing errors.

Every error a user can cause (bad arguments, bad files, bad recipes) is a :class:`GQAError` whose
message is one line that names the problem and the fix. The CLI prints it without a traceback
and exits non-zero; library users can catch it.
"""

from __future__ import annotations


class GQAError(Exception):
    """A problem with the user's input, with a message that says what to do about it."""

    exit_code = 2


class CheckpointError(GQAError):
    """A checkpoint (source folder, shard, index, config) is missing, incomplete or corrupt."""


class ConfigError(GQAError):
    """An argument or recipe value is invalid."""


class OutputExistsError(GQAError):
    """The output location already holds something that would be overwritten."""


class DiskFullError(GQAError, OSError):
    """The output's filesystem has (or ran out of) less free space than the output needs.

    Also an :class:`OSError`, so code that already handles write failures keeps catching it.
    """
