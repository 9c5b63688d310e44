"""Optional optimizers beside AdamW: Prodigy, schedule-free AdamW, Adafactor (and the check
for 8-bit AdamW's package).

Each lives in its own package, installed only by those who use it, so a missing one is
reported in one line naming the package, before minutes of model loading
(`config.checks.check_optimizer_package`, at config load).

Schedule-free AdamW trains on one sequence of weights (y) and evaluates on another (x, the
average). `eval_weights` switches the model to x for validation, samples and saving, and back
afterwards; checkpoints are written in training mode, so a resumed run continues from
exactly the state an uninterrupted one had.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from personalize.config import ConfigError, PersonalizeConfig
from personalize.config.checks import check_optimizer_package

logger = logging.getLogger(__name__)

EXTRA_OPTIMIZERS = ("prodigy", "adamw_schedulefree", "adafactor")


def make_extra_optimizer(cfg: PersonalizeConfig, param_groups: list[dict[str, Any]]):
    """The optimizer named by `train.optimizer`, one of EXTRA_OPTIMIZERS."""
    t = cfg.train
    check_optimizer_package(t.optimizer)
    betas = (t.adam_beta1, t.adam_beta2)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if t.lr < 0.1:
            logger.warning(
                "train.optimizer=prodigy estimates the step size itself; train.lr=%g "
                "multiplies that estimate and is usually 1.0",
                t.lr,
            )
        return Prodigy(
            param_groups, lr=t.lr, betas=betas, eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
    if t.optimizer == "adamw_schedulefree":
        from schedulefree import AdamWScheduleFree

        if t.lr_scheduler != "constant":
            logger.warning(
                "train.optimizer=adamw_schedulefree needs no LR schedule; train.lr_scheduler="
                "%s still scales its LR (use constant, with train.lr_warmup_steps for warm-up)",
                t.lr_scheduler,
            )
        optimizer = AdamWScheduleFree(
            param_groups, lr=t.lr, betas=betas, eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
        optimizer.train()  # it starts in eval mode and refuses to step there
        return optimizer
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # The given LR, not Adafactor's relative step (that would ignore train.lr).
        return Adafactor(
            param_groups,
            lr=t.lr,
            weight_decay=t.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    raise ConfigError(f"train.optimizer: unknown optimizer {t.optimizer!r}")


@contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """Evaluation weights in the model for the block, for optimizers that keep two sets
    (schedule-free); a no-op for the others and when already in eval mode (nesting)."""
    raw = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
    switch = callable(getattr(raw, "eval", None)) and bool(
        raw.param_groups[0].get("train_mode", False)
    )
    if switch:
        raw.eval()
    try:
        yield
    finally:
        if switch:
            raw.train()


def make_lr_scheduler(cfg: PersonalizeConfig, optimizer, num_processes: int):
    """diffusers' LR schedule of `train.lr_scheduler`. Counted in scheduler steps of all
    processes: accelerate steps a prepared scheduler once per process and step."""
    from diffusers.optimization import get_scheduler

    t = cfg.train
    return get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.lr_warmup_steps * num_processes,
        num_training_steps=t.max_steps * num_processes,
    )
