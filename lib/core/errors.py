"""Errors a user can cause: one base class, so every entry point turns them into one sentence.
"""
from __future__ import annotations


class StageError(RuntimeError):
    """A user-facing failure of a stage (missing upstream, bad input); one sentence with the fix."""


class StageLocked(StageError):
    """Another live run holds the stage's folder."""
