"""The NaN/inf guard: skip optimizer steps whose loss or gradient is not finite, and stop
after `train.max_nonfinite_steps` of them in a row, without a host sync on every step.

Reading a GPU number on the host (`float(loss)`) waits for every queued kernel, so a
per-step check leaves the GPU idle while Python prepares the next step. Here the decision
stays on the device:

* With a fused AdamW (the default), the optimizer's own `found_inf` input (the one
  `GradScaler` uses) makes the kernel leave weights, moments and step count untouched on a
  non-finite step. No host involvement at all.
* With fp16, accelerate's grad scaler already skips steps with inf/nan gradients (that is
  how it finds its scale), so only a non-finite *loss* counts as bad.
* Other optimizers (8-bit AdamW, `train.fused_optimizer=false`) cannot skip on the device:
  the guard reads the flag on the host every step, as before.

Counters (current streak, longest streak, skipped steps, loss sum) are device tensors
read together, once, every `check_every` steps; the loop makes `check_every` at most
`max_nonfinite_steps`, so a run of bad steps is caught within that many steps, and it
checks before every checkpoint, validation and the end. Every process computes the same
flags: the loss is averaged over processes and the gradients are all-reduced, so all skip
the same steps and stop at the same check.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from personalize.errors import NonFiniteError

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    def __init__(
        self, optimizer, device: torch.device, *, max_streak: int, check_every: int, fp16: bool
    ):
        self.optimizer = optimizer
        self.raw = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
        self.fp16 = fp16
        self.on_device = not fp16 and bool(getattr(self.raw, "defaults", {}).get("fused"))
        self.max_streak = max_streak
        # Without device-side skipping the flag is on the host every step anyway.
        self.check_every = max(1, check_every) if self.on_device or fp16 else 1
        zeros = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        self.streak, self.worst, self.skipped = (zeros(torch.int64) for _ in range(3))
        self.loss_sum, self.loss_count = zeros(torch.float32), zeros(torch.int64)
        self.grad_norm = zeros(torch.float32)
        self.first_unchecked_step = 1
        self.warned = 0  # skipped steps of this log interval already reported

    def step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Step the optimizer unless this step's loss/gradient is not finite."""
        loss = loss.detach().float()
        grad_norm = torch.as_tensor(grad_norm, device=loss.device).detach().float()
        finite = torch.isfinite(loss)
        if not self.fp16:
            finite = finite & torch.isfinite(grad_norm)
        if self.fp16:
            self.optimizer.step()  # the scaler skips inf/nan gradients itself
        elif self.on_device:
            self.raw.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                self.raw.found_inf = None
        elif bool(finite):  # host sync: only where the optimizer cannot skip on the device
            self.optimizer.step()
        bad = (~finite).long()
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)
        self.skipped += bad
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
        self.loss_count += finite.long()
        self.grad_norm = grad_norm

    def check(self, step: int, log: bool = True) -> dict[str, Any]:
        """Read the counters (one sync); raise NonFiniteError after too long a streak.

        Returns the mean finite loss, the skipped steps and the last gradient norm since the
        previous check with `log=True` (the loop's log interval), then starts a new one."""
        worst, streak, skipped, loss_sum, count, grad_norm = torch.stack(
            [
                self.worst.float(),
                self.streak.float(),
                self.skipped.float(),
                self.loss_sum,
                self.loss_count.float(),
                self.grad_norm,
            ]
        ).tolist()
        self.worst = self.streak.clone()
        if skipped > self.warned:
            logger.warning(
                "step %d: %d step(s) with a non-finite loss/gradient skipped since "
                "step %d (last grad_norm=%s)",
                step,
                int(skipped - self.warned),
                self.first_unchecked_step,
                grad_norm,
            )
        self.warned = int(skipped)
        self.first_unchecked_step = step + 1
        if worst >= self.max_streak:
            raise NonFiniteError(int(worst))
        if log:
            self.skipped.zero_()
            self.loss_sum.zero_()
            self.loss_count.zero_()
            self.warned = 0
        return {
            "loss": loss_sum / count if count else float("nan"),
            "grad_norm": grad_norm,
            "skipped": int(skipped),
            "streak": int(streak),
        }
