"""Optional optimizers beside AdamW: Prodigy, schedule-free AdamW, Adafactor (and the check
for 8-bit AdamW's package).

Each lives in its own package, installed only by those who use it, so a missing one is
reported in one line naming the package, before minutes of model loading
(`check_available`, called first thing by the Trainer).

Schedule-free AdamW trains on one sequence of weights (y) and evaluates on another (x, the
average). `eval_weights` switches the model to x for validation, samples and saving, and back
afterwards; checkpoints are written in training mode, so a resumed run continues from
exactly the state an uninterrupted one had.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from personalize.config import ConfigError, PersonalizeConfig

logger = logging.getLogger(__name__)

# train.optimizer -> (module to import, package to install); None = always there (torch).
OPTIMIZER_PACKAGES: dict[str, tuple[str, str] | None] = {
    "adamw": None,
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adamw_schedulefree": ("schedulefree", "schedulefree"),
    "adafactor": ("transformers", "transformers"),
}
EXTRA_OPTIMIZERS = ("prodigy", "adamw_schedulefree", "adafactor")


def check_available(name: str) -> None:
    """A one-line error naming the package when `train.optimizer` needs one that is missing."""
    needs = OPTIMIZER_PACKAGES.get(name)
    if needs is None:
        return
    module, package = needs
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"train.optimizer={name} needs the {package} package, which is not installed: "
            f"pip install {package}"
        )


def make_extra_optimizer(cfg: PersonalizeConfig, param_groups: list[dict[str, Any]]):
    """The optimizer named by `train.optimizer`, one of EXTRA_OPTIMIZERS."""
    t = cfg.train
    check_available(t.optimizer)
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
