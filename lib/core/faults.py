"""Fault points: `PIPELINE_KILL_AT=<point>` SIGKILLs a run at a named place, so the fault tests kill for real;
`PIPELINE_PAUSE_AT=<point>` SIGSTOPs it there, so the concurrency tests hold a run mid-way (SIGCONT resumes it).
"""
from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "PIPELINE_KILL_AT"
PAUSE_ENV = "PIPELINE_PAUSE_AT"


_fault_counts: dict[str, int] = {}
_paused: set[str] = set()


def fault_point(name: str) -> None:
    """Tests only: `PIPELINE_KILL_AT=<name>[@<n>]` SIGKILLs this process the n-th time (default the 1st) it gets here.

    Named points: `write:<file name>` (an atomic write whose temp file is complete but not yet
    renamed), `train_batch <stage>/fold_<k> epoch <e>` (after each optimiser step) and
    `download_chunk` (after each chunk a download writes). A kill -9 cannot be caught, so this
    is the real fault, at a deterministic place.
    """
    if os.environ.get(PAUSE_ENV) == name and name not in _paused:  # the first time only
        _paused.add(name)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want, _, nth = spec.rpartition("@") if "@" in spec else (spec, "", "1")
    if want != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
