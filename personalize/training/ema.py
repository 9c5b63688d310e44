"""An exponential moving average (EMA) of the trained weights (`train.ema_decay`).

diffusers' `EMAModel` holds the shadow copy, its decay schedule and the swap in and out;
after each optimizer step `shadow += (1 - d) * (weight - shadow)`, with
d = min(ema_decay, (1 + s) / (10 + s)) at the s-th update after the first (or, with
`train.ema_warmup`, d = min(ema_decay, 1 - (1 + s) ** -ema_power)); the first update copies
the weights (d = 0). Only the method's trainable weights are averaged (a LoRA's adapters,
TI's embedding table, ...), so frozen weights are never touched.

The averaged weights are what is validated, sampled and saved: `applied()` swaps them in and
the raw ones back bit for bit, so training continues exactly where it was. A checkpoint
holds the average beside the raw weights, as `ema.safetensors` in the method's own
trainable-state layout (TI: the new rows only), so a resumed run is bit-identical. Every
process keeps its own copy: the weights are the same on all ranks after a step and the
update is deterministic, so the copies stay equal; only the main process writes the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from personalize.errors import CheckpointMismatch
from personalize.training.optimizers import eval_weights

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"


class WeightEMA:
    """The EMA of `params` (the optimizer's), with accelerate checkpoint hooks."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        decay: float,
        *,
        warmup: bool = False,
        power: float = 2 / 3,
        accelerator=None,
        method=None,
        parts=None,
    ):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.ema = EMAModel(self.params, decay=decay, use_ema_warmup=warmup, power=power)
        self._applied = False
        self.accelerator, self.method, self.parts = accelerator, method, parts
        if accelerator is not None:
            accelerator.register_save_state_pre_hook(self._save)
            accelerator.register_load_state_pre_hook(self._load)

    @property
    def shadow(self) -> list[torch.Tensor]:
        return self.ema.shadow_params

    @property
    def step_count(self) -> int:
        return self.ema.optimization_step

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (and after the method's own after-step fix-ups)."""
        if self.ema.optimization_step == 0:
            # diffusers' decay is 0 at the first update: the shadow becomes the weights.
            # Copied rather than computed as s - (s - w), which may round, so rows that
            # never train (TI's frozen embedding rows) are bit-identical from here on
            # (a lerp between equal values is exact).
            for s, p in zip(self.shadow, self.params):
                s.copy_(p)
            self.ema.optimization_step = 1
            self.ema.cur_decay_value = 0.0
            return
        # diffusers' schedule, but an in-place lerp instead of EMAModel.step: that allocates
        # s - w (a second copy of a full UNet), and copies instead of averaging a weight
        # that stopped training (DreamBooth's stop_text_encoder_training), a jump.
        self.ema.optimization_step += 1
        decay = self.ema.get_decay(self.ema.optimization_step)
        self.ema.cur_decay_value = decay
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block; the raw ones back afterwards,
        exactly (a copy, not arithmetic). Nesting is a no-op."""
        if self._applied:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        self._applied = True
        try:
            yield
        finally:
            self.ema.restore(self.params)
            self._applied = False

    # --- checkpoints (accelerate's save/load_state hooks) -------------------------------

    def _save(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            with self.applied():
                state = self.method.trainable_state_dict(self.parts)
                save_file(
                    {k: v.float().cpu().contiguous() for k, v in state.items()},
                    str(Path(output_dir) / EMA_FILE),
                    metadata={"optimization_step": str(self.step_count)},
                )

    def _load(self, models, input_dir) -> None:
        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            raise CheckpointMismatch(
                f"it holds no {EMA_FILE}: it was written with train.ema_decay off"
            )
        try:
            state = load_file(str(path))
            with safe_open(str(path), "pt") as f:  # the step count is in the metadata
                step = int((f.metadata() or {})["optimization_step"])
            # Read the average through the method's own loader (TI rebuilds its frozen
            # rows exactly), then take it as the shadow; the raw weights come back after.
            with self.applied():
                self.method.load_trainable_state_dict(self.parts, state)
                for s, p in zip(self.shadow, self.params):
                    s.copy_(p)
        except (ValueError, KeyError, OSError, SafetensorError) as e:
            raise CheckpointMismatch(f"{EMA_FILE}: {e}") from e
        self.ema.optimization_step = step


def make_ema(cfg, params, accelerator, method, parts) -> WeightEMA | None:
    """The run's EMA, or None when `train.ema_decay` is off (null or 0)."""
    t = cfg.train
    if not t.ema_decay:
        return None
    if t.optimizer == "adamw_schedulefree":
        logger.info(
            "train.ema_decay with adamw_schedulefree: the EMA of the trained weights is "
            "validated and saved in place of the optimizer's own averaged weights"
        )
    return WeightEMA(
        params,
        t.ema_decay,
        warmup=t.ema_warmup,
        power=t.ema_power,
        accelerator=accelerator,
        method=method,
        parts=parts,
    )


def evaluation_weights(optimizer, ema: WeightEMA | None):
    """The weights to validate, sample and save: the EMA when there is one, else the
    optimizer's evaluation weights (schedule-free's average; the raw weights otherwise).
    Not both: schedule-free's switch assumes the model holds its training weights."""
    if ema is not None:
        return ema.applied()
    return eval_weights(optimizer)


def ema_only(ema: WeightEMA | None):
    """The EMA swapped in, or nothing: for a save made on the main process alone, where a
    switch that is not bit-exact (schedule-free's) would make the ranks' weights differ."""
    return ema.applied() if ema is not None else nullcontext()
