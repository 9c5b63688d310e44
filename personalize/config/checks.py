"""Range checks that types alone cannot express, and the list of methods.

The general sections (train, data, validation, model) are checked here; every other
section checks itself (`method_sections.py`), so a method's rules live beside its options.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
from functools import cache
from pathlib import Path

from personalize.config.sections import PersonalizeConfig
from personalize.errors import ConfigError, need

_METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


@cache
def method_names() -> tuple[str, ...]:
    """Every method: a module `personalize/methods/<name>.py` whose Method subclass says
    `name = "<name>"` (the convention `get_method` imports by). Read from the files, not
    imported, so config stays below methods and no method's dependencies load here."""
    names = []
    for path in sorted(_METHODS_DIR.glob("*.py")):
        quoted = f"[\"']{re.escape(path.stem)}[\"']"
        if re.search(
            rf"^\s+name(: ClassVar\[str\])? = {quoted}", path.read_text(encoding="utf-8"), re.M
        ):
            names.append(path.stem)
    return tuple(names)


# train.optimizer -> (module to import, package to install); None = always there (torch).
OPTIMIZER_PACKAGES: dict[str, tuple[str, str] | None] = {
    "adamw": None,
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adamw_schedulefree": ("schedulefree", "schedulefree"),
    "adafactor": ("transformers", "transformers"),
}


def check_optimizer_package(name: str) -> None:
    """A one-line error naming the package when `train.optimizer` needs one that is missing:
    at config load, before minutes of model loading."""
    needs = OPTIMIZER_PACKAGES.get(name)
    if needs is not None:
        module, package = needs
        need(
            importlib.util.find_spec(module) is not None,
            "train.optimizer",
            f"{name} needs {package}, which is not installed: pip install {package}",
        )


def validate(cfg: PersonalizeConfig) -> None:
    """Range checks that types alone cannot express."""

    names = method_names()
    need(cfg.method in names, "method", f"must be one of {', '.join(names)}, got {cfg.method!r}")
    # numpy's legacy seeding (accelerate's set_seed) takes 0 .. 2**32 - 1.
    need(0 <= cfg.seed < 2**32, "seed", f"must be an integer in [0, 2**32), got {cfg.seed}")
    t = cfg.train
    need(t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    need(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0 and finite, got {t.lr}")
    need(
        t.lr_warmup_steps >= 0,
        "train.lr_warmup_steps",
        f"must be >= 0 (0 = no warm-up), got {t.lr_warmup_steps}",
    )
    need(
        t.early_stopping_patience >= 0,
        "train.early_stopping_patience",
        f"must be >= 0 (0 = off), got {t.early_stopping_patience}",
    )
    need(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    need(
        t.resolution >= 8 and t.resolution % 8 == 0,
        "train.resolution",
        f"must be a positive multiple of 8, got {t.resolution}",
    )
    need(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
    need(
        t.mixed_precision in ("no", "fp16", "bf16"),
        "train.mixed_precision",
        f"must be no (or fp32), fp16 or bf16, got {t.mixed_precision!r}",
    )
    need(
        t.optimizer in OPTIMIZER_PACKAGES,
        "train.optimizer",
        "must be adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt), adamw_schedulefree "
        f"(schedulefree) or adafactor, got {t.optimizer!r}",
    )
    check_optimizer_package(t.optimizer)
    _validate_lr_scheduler(t.lr_scheduler)
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = no clipping)")
    need(t.snr_gamma is None or t.snr_gamma > 0, "train.snr_gamma", "must be > 0 or null")
    need(
        not t.ema_decay or 0 < t.ema_decay < 1,
        "train.ema_decay",
        f"must be in (0, 1), e.g. 0.99, or null/0 for no EMA; got {t.ema_decay}",
    )
    need(t.ema_power > 0, "train.ema_power", f"must be > 0, got {t.ema_power}")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(t.checkpoints_total_limit >= 1, "train.checkpoints_total_limit", "must be >= 1")
    need(
        t.report_to in ("tensorboard", "wandb", "none"),
        "train.report_to",
        f"must be tensorboard, wandb or none, got {t.report_to!r}",
    )
    need(
        t.attention in ("sdpa", "xformers"),
        "train.attention",
        f"must be sdpa or xformers, got {t.attention!r}",
    )
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    d = cfg.data
    need(0.0 <= d.validation_split < 1.0, "data.validation_split", "must be in [0, 1)")
    need(0.0 <= d.caption_dropout <= 1.0, "data.caption_dropout", "must be in [0, 1]")
    need(d.repeats >= 1, "data.repeats", "must be >= 1")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _validate_concepts(cfg)
    need(
        d.mask_source in ("alpha", "file", "auto"),
        "data.mask_source",
        f"must be alpha, file or auto, got {d.mask_source!r}",
    )
    need(0.0 <= d.unmasked_weight <= 1.0, "data.unmasked_weight", "must be in [0, 1]")
    if d.bucketing:
        need(
            d.bucket_step > 0 and d.bucket_step % 8 == 0,
            "data.bucket_step",
            f"must be a positive multiple of 8, got {d.bucket_step}",
        )
        need(
            d.bucket_min_size <= t.resolution <= d.bucket_max_size,
            "data.bucket_min_size",
            f"data.bucket_min_size ({d.bucket_min_size}) <= train.resolution "
            f"({t.resolution}) <= data.bucket_max_size ({d.bucket_max_size}) must hold",
        )
    m = cfg.model
    need(
        m.prediction_type in (None, "epsilon", "v_prediction"),
        "model.prediction_type",
        "must be epsilon, v_prediction or null",
    )
    v = cfg.validation
    need(
        all(0 <= ts < 1000 for ts in v.loss_timesteps),
        "validation.loss_timesteps",
        "must be timesteps in [0, 1000)",
    )
    for key in ("every_steps", "loss_every_steps"):
        need(
            getattr(v, key) >= 0,
            f"validation.{key}",
            f"must be >= 0 (0 = off), got {getattr(v, key)}",
        )
    _validate_held_out(cfg)
    # Every section with its own rules (prior, regularization, one per method).
    for f in dataclasses.fields(cfg):
        check = getattr(getattr(cfg, f.name), "check", None)
        if check is not None:
            check(cfg)


def _validate_concepts(cfg: PersonalizeConfig) -> None:
    """data.concepts[i]: the ranges of each concept's own settings (folders are checked when
    the data is read: data/concepts.py)."""
    d = cfg.data
    need(
        d.concept_balance in ("repeats", "equal"),
        "data.concept_balance",
        f"must be repeats or equal, got {d.concept_balance!r}",
    )
    if d.concepts:
        need(
            not d.path,
            "data.path",
            "and data.concepts are both set; list every folder under data.concepts "
            "(each with its own prompt) and remove data.path",
        )
    for i, c in enumerate(d.concepts):
        key = f"data.concepts[{i}]"
        need(bool(c.path), f"{key}.path", "is empty; give the concept's image folder")
        need(c.repeats >= 1, f"{key}.repeats", f"must be >= 1, got {c.repeats}")
        need(
            c.caption_dropout is None or 0.0 <= c.caption_dropout <= 1.0,
            f"{key}.caption_dropout",
            "must be in [0, 1]",
        )
        need(c.keep_tokens is None or c.keep_tokens >= 0, f"{key}.keep_tokens", "must be >= 0")
        need(
            c.num_class_images is None or c.num_class_images >= 1,
            f"{key}.num_class_images",
            "must be >= 1",
        )


def _validate_lr_scheduler(name: str) -> None:
    from diffusers.optimization import SchedulerType

    valid = [s.value for s in SchedulerType]
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(
            f"train.lr_scheduler: unknown scheduler {name!r}{hint} Valid: {', '.join(valid)}"
        )


def _validate_held_out(cfg: PersonalizeConfig) -> None:
    """Held-out images, the validation loss and early stopping only work together; any one
    without the others used to be ignored without a word (or cost training images)."""
    d, v, patience = cfg.data, cfg.validation, cfg.train.early_stopping_patience
    if d.validation_path:
        held_out = f"data.validation_path={d.validation_path}"
    elif d.validation_split > 0:
        held_out = f"data.validation_split={d.validation_split:g}"
    else:
        held_out = None
    if patience and not (held_out and v.loss_every_steps):
        raise ConfigError(
            f"train.early_stopping_patience={patience} needs the validation loss: set "
            "validation.loss_every_steps (e.g. 50) and data.validation_split (e.g. 0.2) or "
            "data.validation_path; or train.early_stopping_patience=0"
        )
    if held_out and not v.loss_every_steps:
        raise ConfigError(
            f"{held_out} holds out images for the validation loss, but "
            "validation.loss_every_steps is 0 (off), so they would only be missing from "
            f"training; set validation.loss_every_steps (e.g. 50), or {held_out.split('=')[0]}"
            f"={'null' if d.validation_path else '0'}"
        )
    if v.loss_every_steps and not held_out:
        raise ConfigError(
            f"validation.loss_every_steps={v.loss_every_steps} needs held-out images: set "
            "data.validation_split (e.g. 0.2) or data.validation_path; or "
            "validation.loss_every_steps=0"
        )
