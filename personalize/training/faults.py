"""Fault injection for the reliability tests, off unless PERSONALIZE_FAULT is set.

`PERSONALIZE_FAULT=<point>:<step>` makes the process fail at that point the way real
failures do: `kill_point` SIGKILLs it (power cut, OOM killer), `error_point` raises (a
file that became unreadable on one rank). The tests use it to prove a half-written
checkpoint is never used and that one failing rank does not leave the others hanging.
"""

from __future__ import annotations

import os
import signal

ENV = "PERSONALIZE_FAULT"


def _armed(point: str, step: int) -> bool:
    return os.environ.get(ENV) == f"{point}:{step}"


def kill_point(point: str, step: int) -> None:
    if _armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def error_point(point: str, step: int) -> None:
    if _armed(point, step):
        raise OSError(f"injected fault {point} at step {step} ({ENV})")
