"""What is due after an optimizer step: log, validate, sample, save, checkpoint, stop.

One small object decides it from the finished step number, so the loop reads as "do what is
due" and every process, asking with the same number, decides the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Due:
    """What the loop does after one step. `stop`: max_steps reached."""

    log: bool = False
    validate: bool = False
    sample: bool = False
    save: bool = False
    checkpoint: bool = False
    stop: bool = False
    check_guard: bool = False

    @property
    def sync_point(self) -> bool:
        """The processes meet anyway (a collective, a log line): the host may read the NaN
        guard's numbers and the processes agree on a stop signal here, and nowhere else."""
        return (
            self.log
            or self.stop
            or self.validate
            or self.sample
            or self.checkpoint
            or self.check_guard
        )


@dataclass(frozen=True)
class Schedule:
    """Every N steps for each periodic task; 0 (or False for `sample`) switches one off."""

    max_steps: int
    log_every: int
    validate_every: int = 0
    sample_every: int = 0
    save_every: int = 0
    checkpoint_every: int = 0
    check_guard_every: int = 1

    def at(self, step: int) -> Due:
        """What is due after `step` finished steps (1 after the first)."""
        stop = step >= self.max_steps

        def every(n: int) -> bool:
            return bool(n) and step % n == 0

        return Due(
            log=every(self.log_every) or step == 1 or stop,
            validate=every(self.validate_every),
            sample=every(self.sample_every),
            save=every(self.save_every),
            checkpoint=every(self.checkpoint_every),
            stop=stop,
            check_guard=every(self.check_guard_every),
        )
