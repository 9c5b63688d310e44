"""SIGINT/SIGTERM: finish the current step, save a checkpoint, exit cleanly.

Schedulers such as SLURM send SIGTERM some time before they kill a job, and Ctrl-C sends
SIGINT. Either one sets a flag; the loop sees it at the next step boundary, saves a
resumable checkpoint and raises `TrainingInterrupted`. A second signal more than a few
seconds later falls back to the default behaviour (stop now), so a user can always get out.

Under several processes the signal may reach only some ranks, so the loop agrees on the
flag with an all-reduce before stopping: every rank then saves and stops at the same step.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import torch

from personalize.errors import TrainingInterrupted  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

HANDLED = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_SECONDS = 3.0


class StopRequest:
    """Installs the handlers for the duration of a `with` block."""

    def __init__(self, then: str = "saving a checkpoint after this step, then stopping"):
        self.then = then  # what happens next, for the log line
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        # Handlers can only be installed from the main thread (e.g. not inside a notebook
        # worker thread); there the run simply keeps the default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is not None:
            # Launchers forward the signal a terminal or scheduler already sent to the whole
            # process group (torchrun does), so one that comes right after the first is the
            # same request. A later one is the user insisting: default behaviour, stop now.
            if now - self._first_at > DUPLICATE_WINDOW_SECONDS:
                signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
                signal.raise_signal(signum)
            return
        self.signum, self._first_at = signum, now
        logger.warning("received %s: %s", signal.Signals(signum).name, self.then)

    def agreed(self, accelerator, at_sync_point: bool) -> int | None:
        """The signal to stop on, agreed by all processes: compared only where the ranks
        sync anyway (a collective elsewhere would cost every step a wait)."""
        if accelerator.num_processes == 1:
            return self.signum
        if not at_sync_point:
            return None
        flag = torch.tensor(float(self.signum or 0), device=accelerator.device)
        return int(accelerator.reduce(flag, "max")) or None
