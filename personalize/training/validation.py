"""Validation during training: a comparable held-out loss, and sample images."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from personalize.training.data import collate
from personalize.training.noise import per_example_loss, training_target

if TYPE_CHECKING:
    from personalize.config import ValidationConfig
    from personalize.models import SDParts
    from personalize.training.conditioning import Conditioning

logger = logging.getLogger(__name__)


class EarlyStopping:
    """The best validation loss so far (its step) and how many evaluations since then did
    not improve on it; both go into checkpoints, so a resumed run decides the same.
    `best_dir`: where the loop keeps the best weights (for the log line)."""

    def __init__(self, patience: int, best_dir: Path):
        self.patience = patience
        self.best_dir = best_dir
        self.best: dict = {"loss": math.inf, "step": None}
        self.patience_used = 0

    def state(self) -> dict:
        return {"best": self.best, "patience_used": self.patience_used}

    def load_state(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.patience_used = state.get("patience_used", 0)

    def record(self, loss: float, step: int) -> bool:
        """Note the loss of `step`; True when it is the best so far."""
        if loss < self.best["loss"]:
            self.best = {"loss": loss, "step": step}
            self.patience_used = 0
            return True
        self.patience_used += 1
        if self.should_stop:
            logger.info(
                "early stopping at step %d: the validation loss has not improved for %d "
                "evaluations; best validation loss %.6g at step %s (weights in %s)",
                step,
                self.patience,
                self.best["loss"],
                self.best["step"],
                self.best_dir,
            )
        return False

    @property
    def should_stop(self) -> bool:
        return bool(self.patience and self.patience_used >= self.patience)


class ValidationLoss:
    """Denoising loss on held-out images at fixed timesteps with fixed noise.

    Training loss is too noisy to compare from step to step (random timesteps, random
    noise); holding both fixed makes this number move only when the model does, so it can
    drive early stopping and the choice of the best checkpoint.
    """

    def __init__(
        self,
        dataset,
        timesteps: list[int],
        seed: int,
        mask_weighting: tuple[float, bool] = (0.0, True),
    ):
        self.dataset = dataset
        self.timesteps = timesteps
        self.seed = seed
        # (unmasked_weight, normalize) for held-out images with a loss mask (masked_loss).
        self.mask_weighting = mask_weighting

    @torch.no_grad()
    def compute(self, unet: torch.nn.Module, conditioning: Conditioning, scheduler) -> float:
        """The mean loss over every held-out image and timestep, the same on every process.
        `unet`: the one training calls (maybe wrapped)."""
        acc = conditioning.accelerator
        total = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device)
        self.dataset.set_epoch(0)
        with evaluating(unet, *conditioning.wrapped.values()):
            # Each process takes every num_processes-th image; the sums are reduced, so
            # every process gets the same number and makes the same early-stopping decision.
            for i in range(acc.process_index, len(self.dataset), acc.num_processes):
                batch = collate([self.dataset[i]])
                gen = torch.Generator(device=acc.device).manual_seed(self.seed * 31 + i)
                latents = conditioning.latents(batch, gen)
                text = conditioning.text(batch["captions"], time_ids=conditioning.time_ids(batch))
                for t in self.timesteps:
                    noise = torch.randn(latents.shape, generator=gen, device=latents.device)
                    ts = torch.tensor([t], device=latents.device)
                    noisy = scheduler.add_noise(latents, noise, ts)
                    with acc.autocast():
                        pred = unet(
                            noisy, ts, text.hidden_states, **text.unet_kwargs, return_dict=False
                        )[0]
                    target = training_target(scheduler, latents, noise, ts)
                    if "loss_mask" in batch:  # measured as training measures it
                        total += per_example_loss(
                            pred,
                            target,
                            scheduler,
                            ts,
                            None,
                            batch["loss_mask"],
                            *self.mask_weighting,
                        ).mean()
                    else:
                        total += torch.nn.functional.mse_loss(pred.float(), target.float())
                    count += 1
        total = acc.reduce(total, "sum")
        count = acc.reduce(count, "sum")
        return float(total / count) if float(count) > 0 else math.inf


@contextlib.contextmanager
def evaluating(*modules: torch.nn.Module):
    """Modules in eval mode (no dropout) inside, back to their own mode after."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, was in zip(modules, was_training):
            m.train(was)


def save_validation_samples(
    parts: SDParts,
    accelerator,
    settings: ValidationConfig,
    prompts: list[str],
    *,
    resolution: int,
    step: int,
    folder: Path,
) -> Path | None:
    """Main process draws `prompts` with fixed seeds into one grid per step."""
    from personalize.inference import generate, make_grid
    from personalize.models import pipeline_from_parts

    v = settings
    path = None
    if accelerator.is_main_process:
        pipe = pipeline_from_parts(parts)
        with evaluating(parts.unet, *parts.text_encoders().values()), accelerator.autocast():
            images = generate(
                pipe,
                prompts,
                seeds=list(range(v.seed, v.seed + v.num_images)),
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                resolution=resolution,
            )
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        grid = make_grid([[img for img in row] for row in images], row_labels=prompts)
        grid.save(path)
        logger.info("validation samples: %s", path)
    accelerator.wait_for_everyone()
    return path
