"""Validation during training: a comparable held-out loss, and sample images."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from personalize.training.data import collate
from personalize.training.noise import training_target

if TYPE_CHECKING:
    from personalize.training.loop import Trainer

logger = logging.getLogger(__name__)


class ValidationLoss:
    """Denoising loss on held-out images at fixed timesteps with fixed noise.

    Training loss is too noisy to compare from step to step (random timesteps, random
    noise); holding both fixed makes this number move only when the model does, so it can
    drive early stopping and the choice of the best checkpoint.
    """

    def __init__(self, dataset, timesteps: list[int], seed: int):
        self.dataset = dataset
        self.timesteps = timesteps
        self.seed = seed

    @torch.no_grad()
    def compute(self, trainer: Trainer) -> float:
        acc = trainer.accelerator
        sched = trainer.parts.noise_scheduler
        total = torch.zeros((), device=acc.device)
        count = torch.zeros((), device=acc.device)
        self.dataset.set_epoch(0)
        modules = [trainer.unet, trainer.text_encoder]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        # Each process takes every num_processes-th image; the sums are reduced, so every
        # process gets the same number and makes the same early-stopping decision.
        for i in range(acc.process_index, len(self.dataset), acc.num_processes):
            batch = collate([self.dataset[i]])
            gen = torch.Generator(device=acc.device).manual_seed(self.seed * 31 + i)
            latents = trainer._batch_latents(batch, gen)
            hidden = trainer._encode_text(batch["captions"])
            for t in self.timesteps:
                noise = torch.randn(latents.shape, generator=gen, device=latents.device)
                ts = torch.tensor([t], device=latents.device)
                noisy = sched.add_noise(latents, noise, ts)
                with acc.autocast():
                    pred = trainer.unet(noisy, ts, hidden, return_dict=False)[0]
                target = training_target(sched, latents, noise, ts)
                total += torch.nn.functional.mse_loss(pred.float(), target.float())
                count += 1
        for m, was in zip(modules, was_training):
            m.train(was)
        total = acc.reduce(total, "sum")
        count = acc.reduce(count, "sum")
        return float(total / count) if float(count) > 0 else math.inf


def save_validation_samples(trainer: Trainer, folder: Path) -> Path | None:
    """Main process draws the validation prompts with fixed seeds into one grid per step."""
    from personalize.inference import generate, make_grid
    from personalize.models import pipeline_from_parts

    acc, v = trainer.accelerator, trainer.cfg.validation
    path = None
    if acc.is_main_process:
        modules = [trainer.parts.unet, trainer.parts.text_encoder]
        was_training = [m.training for m in modules]
        for m in modules:
            m.eval()
        pipe = pipeline_from_parts(trainer.parts)
        with acc.autocast():
            images = generate(
                pipe,
                v.prompts,
                seeds=list(range(v.seed, v.seed + v.num_images)),
                num_inference_steps=v.num_inference_steps,
                guidance_scale=v.guidance_scale,
                resolution=trainer.cfg.train.resolution,
            )
        for m, was in zip(modules, was_training):
            m.train(was)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{trainer.global_step:06d}.png"
        grid = make_grid([[img for img in row] for row in images], row_labels=v.prompts)
        grid.save(path)
        logger.info("validation samples: %s", path)
    acc.wait_for_everyone()
    return path
