"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (a bad config key, a missing
folder, an unreadable image). The command-line entry points catch it and print
its one-line message with a non-zero exit code instead of a traceback; anything
else is a bug in negmargin and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, with a message that says how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config file, key or value is wrong."""


class DataError(UserError):
    """A dataset is missing, malformed, or has an unreadable file."""


class CheckpointError(UserError):
    """A checkpoint is missing, not ours, corrupt, or for another model."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; raised instead of writing bad weights."""

    exit_code = 3
