"""Errors a user can cause: one base class, so every entry point turns them into one sentence.

`UserError` is what a user can fix (a bad config key, a missing file, a corrupt image, an
unknown class, a locked stage); its message names the thing and the fix. Entry points catch
it and print `error: <message>` with exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of every error a user can cause and fix; the message is one sentence naming both."""


class StageError(UserError, RuntimeError):
    """A user-facing failure of a stage (missing upstream, bad input); one sentence with the fix."""


class StageLocked(StageError):
    """Another live run holds the stage's folder."""
