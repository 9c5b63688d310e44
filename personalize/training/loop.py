"""The one training loop, shared by every method, driven by accelerate.

It owns: the accelerator, precision casts, gradient accumulation, the optimizer and LR
schedule, noise and the denoising loss, a NaN/inf guard, validation (held-out loss, early
stopping, best weights, sample images), logging, checkpoints and resume. A `Method`
(personalize/methods) decides what trains, what joins the loss and what is saved.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from personalize.config import PersonalizeConfig
from personalize.data import ImageCaptionDataset, load_records, split_records
from personalize.methods.base import Method, StepOutputs, get_method
from personalize.models import SDParts, load_parts
from personalize.training import checkpoint as ckpt
from personalize.training.data import build_dataloader, tokenize
from personalize.training.noise import (
    per_example_loss,
    sample_noise,
    sample_timesteps,
    training_target,
)
from personalize.training.validation import ValidationLoss, save_validation_samples

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to do."""


def _check_output_dir(cfg: PersonalizeConfig) -> None:
    out = Path(cfg.output_dir)
    holds_run = (out / RUN_FILE).exists() or ckpt.checkpoint_root(out).exists()
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(
            f"output_dir {out} already holds a run. Set resume=latest to continue it, "
            "overwrite=true to write over it, or choose another output_dir."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output_dir {out} is not writable: {e}") from e


def _make_accelerator(cfg: PersonalizeConfig) -> Accelerator:
    t = cfg.train
    log_with = None
    if t.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed; logging to train_log.jsonl only")
    elif t.report_to == "wandb":
        log_with = "wandb"
    return Accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")
        ),
    )


def _weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )


def _cast_for_training(parts: SDParts, dtype: torch.dtype, device: torch.device) -> None:
    """Frozen weights go to the compute dtype to save memory; trainable ones stay in fp32,
    because fp16/bf16 master weights lose small updates."""
    for module in parts.modules().values():
        module.to(device=device, dtype=dtype)
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def _make_optimizer(cfg: PersonalizeConfig, param_groups: list[dict[str, Any]]):
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                  weight_decay=t.weight_decay)
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError(
                "train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes"
            ) from e
        return bnb.optim.AdamW8bit(param_groups, **kwargs)
    return torch.optim.AdamW(param_groups, **kwargs)


class Trainer:
    """One run: build everything from the config, then `run()`."""

    def __init__(self, cfg: PersonalizeConfig, method: Method | None = None,
                 parts: SDParts | None = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = _make_accelerator(cfg)
        if self.accelerator.is_main_process:
            _check_output_dir(cfg)
        self.accelerator.wait_for_everyone()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        set_seed(cfg.seed)
        m = cfg.model
        self.parts = parts or load_parts(m.path, m.revision, m.variant, m.prediction_type)
        self.method = method or get_method(cfg.method)(cfg)
        for module in self.parts.modules().values():
            module.requires_grad_(False)
        param_groups = self.method.setup(self.parts)
        self.trainable = [p for g in param_groups for p in g["params"]]
        if not self.trainable:
            raise TrainingError(f"method {cfg.method} left nothing trainable")
        self._setup_data()
        self._setup_modules(param_groups)
        self.global_step = 0
        self.log_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------ set up

    def _setup_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        records = load_records(d.path, caption_extension=d.caption_extension,
                               image_column=d.image_column, caption_column=d.caption_column,
                               strict=d.strict)
        if d.validation_path:
            val_records = load_records(d.validation_path, caption_extension=d.caption_extension,
                                       image_column=d.image_column,
                                       caption_column=d.caption_column, strict=d.strict)
        else:
            records, val_records = split_records(records, d.validation_split, self.cfg.seed)
        common = dict(resolution=t.resolution, instance_prompt=d.prompt,
                      caption_fn=self.method.caption_fn(), seed=self.cfg.seed)
        self.train_dataset = ImageCaptionDataset(
            records, center_crop=d.center_crop, random_flip=d.random_flip,
            caption_dropout=d.caption_dropout, shuffle_tags=d.shuffle_tags,
            keep_tokens=d.keep_tokens, repeats=d.repeats, **common,
        )
        self.val_dataset = ImageCaptionDataset(val_records, center_crop=True, **common) \
            if val_records else None
        dataset = self.method.wrap_train_dataset(self.train_dataset, self.parts, self.accelerator)
        self.dataloader = build_dataloader(
            dataset, batch_size=t.batch_size, seed=self.cfg.seed, num_workers=d.num_workers
        )
        logger.info("training on %d images (%d examples per epoch), %d held out, "
                    "%d process(es)", len(records), len(dataset), len(val_records),
                    self.accelerator.num_processes)

    def _setup_modules(self, param_groups: list[dict[str, Any]]) -> None:
        acc, t = self.accelerator, self.cfg.train
        self.weight_dtype = _weight_dtype(acc)
        _cast_for_training(self.parts, self.weight_dtype, acc.device)
        self.trains = {name: any(p.requires_grad for p in m.parameters())
                       for name, m in self.parts.modules().items()}
        if t.gradient_checkpointing:
            if self.trains["unet"]:
                self.parts.unet.enable_gradient_checkpointing()
            if self.trains["text_encoder"]:
                self.parts.text_encoder.gradient_checkpointing_enable()
        for name, module in self.parts.modules().items():
            module.train(self.trains[name])
        optimizer = _make_optimizer(self.cfg, param_groups)
        from diffusers.optimization import get_scheduler

        n = acc.num_processes
        lr_scheduler = get_scheduler(t.lr_scheduler, optimizer,
                                     num_warmup_steps=t.lr_warmup_steps * n,
                                     num_training_steps=t.max_steps * n)
        # Only modules that train are wrapped (DDP syncs their gradients); frozen ones are
        # used as they are.
        self.unet = acc.prepare(self.parts.unet) if self.trains["unet"] else self.parts.unet
        self.text_encoder = acc.prepare(self.parts.text_encoder) \
            if self.trains["text_encoder"] else self.parts.text_encoder
        self.optimizer, self.dataloader, self.lr_scheduler = acc.prepare(
            optimizer, self.dataloader, lr_scheduler
        )
        # Checkpoints hold only the trainable weights (a LoRA checkpoint is megabytes, not
        # the whole UNet); accelerate still saves optimizer, scheduler, scaler and RNG.
        acc.register_save_state_pre_hook(self._save_model_hook)
        acc.register_load_state_pre_hook(self._load_model_hook)

    def _save_model_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            state = self.method.trainable_state_dict(self.parts)
            save_file({k: v.float().cpu().contiguous() for k, v in state.items()},
                      str(Path(output_dir) / ckpt.TRAINABLE_FILE))
        weights.clear()

    def _load_model_hook(self, models, input_dir) -> None:
        state = load_file(str(Path(input_dir) / ckpt.TRAINABLE_FILE))
        self.method.load_trainable_state_dict(self.parts, state)
        models.clear()

    # ------------------------------------------------------------------------ one step

    def _encode_latents(self, pixel_values: torch.Tensor, generator) -> torch.Tensor:
        vae = self.parts.vae
        with torch.no_grad():
            dist = vae.encode(pixel_values.to(self.accelerator.device, vae.dtype)).latent_dist
            latents = dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        ids = tokenize(self.parts.tokenizer, captions).to(self.accelerator.device)
        if self.trains["text_encoder"]:
            return self.text_encoder(ids)[0]
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def _step_generator(self) -> torch.Generator:
        # Noise and timesteps come from (seed, step, rank) alone, so a resumed run draws
        # exactly what an uninterrupted one would.
        g = torch.Generator(device=self.accelerator.device)
        g.manual_seed(self.cfg.seed * 1_000_003 + self.global_step * 101
                      + self.accelerator.process_index)
        return g

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        sched = self.parts.noise_scheduler
        gen = self._step_generator()
        latents = self._encode_latents(batch["pixel_values"], gen)
        noise = sample_noise(latents, gen, self.cfg.train.noise_offset)
        timesteps = sample_timesteps(latents.shape[0], sched.config.num_train_timesteps,
                                     latents.device, gen)
        noisy = sched.add_noise(latents, noise, timesteps)
        hidden = self._encode_text(batch["captions"])
        model_pred = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        target = training_target(sched, latents, noise, timesteps)
        per_example = per_example_loss(model_pred, target, sched, timesteps,
                                       self.cfg.train.snr_gamma)
        loss = self.method.reduce_loss(per_example, batch)
        outputs = StepOutputs(latents, noise, noisy, timesteps, hidden, model_pred, target,
                              self.unet)
        extra = self.method.extra_loss(batch, outputs, self.parts)
        if extra is not None:
            loss = loss + extra
        return loss

    # ------------------------------------------------------------------------ the run

    def _resume(self) -> tuple[int, int]:
        """Load a checkpoint if asked; return (step, micro-batches to skip in its epoch)."""
        path = ckpt.resolve_resume(self.cfg.output_dir, self.cfg.resume)
        if path is None:
            return 0, 0
        self.accelerator.load_state(str(path))
        state = ckpt.read_state(path)
        self.global_step = int(state["step"])
        if self.accelerator.is_main_process:
            # Rows logged after this checkpoint belong to the killed run's lost steps.
            ckpt.truncate_jsonl_after(self.out / LOG_FILE, self.global_step)
        self.best = state.get("best", self.best)
        self.patience_used = state.get("patience_used", 0)
        logger.info("resumed from %s at step %d", path, self.global_step)
        return self.global_step, self.global_step * self.cfg.train.gradient_accumulation_steps

    def _log(self, row: dict[str, Any]) -> None:
        self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.accelerator.is_main_process:
            with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def _checkpoint(self) -> None:
        ckpt.save_checkpoint(self.accelerator, self.out, self.global_step,
                             {"best": self.best, "patience_used": self.patience_used},
                             keep=self.cfg.train.checkpoints_total_limit)

    def _save_artifact(self, out_dir: Path) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.method.save(out_dir, self.parts, self.global_step)
        self.accelerator.wait_for_everyone()

    def _validate(self) -> bool:
        """Held-out loss; returns True when early stopping says to stop."""
        val = self.validation_loss.compute(self)
        improved = val < self.best["loss"]
        self._log({"step": self.global_step, "val_loss": val})
        if improved:
            self.best = {"loss": val, "step": self.global_step}
            self.patience_used = 0
            self._save_artifact(self.out / "best")
            if self.accelerator.is_main_process:
                ckpt.write_json_atomic(self.out / "best" / "best.json", self.best)
        else:
            self.patience_used += 1
        patience = self.cfg.train.early_stopping_patience
        return bool(patience and self.patience_used >= patience)

    def run(self) -> Path:
        acc, t, v = self.accelerator, self.cfg.train, self.cfg.validation
        self.best = {"loss": math.inf, "step": None}
        self.patience_used = 0
        self.validation_loss = ValidationLoss(self.val_dataset, v.loss_timesteps, self.cfg.seed) \
            if self.val_dataset is not None and v.loss_every_steps else None
        start_step, skip = self._resume()
        if acc.is_main_process:
            ckpt.write_json_atomic(self.out / RUN_FILE, {"config": self.cfg.to_dict()})
            acc.init_trackers("personalize")
        per_epoch = len(self.dataloader)
        epoch, skip = divmod(skip, per_epoch)
        bar = tqdm(total=t.max_steps, initial=start_step, desc=f"train {self.cfg.method}",
                   disable=not acc.is_local_main_process)
        nonfinite_streak, started, first_step_seconds = 0, time.perf_counter(), None
        stop = self.global_step >= t.max_steps
        while not stop:
            batches = acc.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            skip = 0
            # accelerate's loaders re-set the sampler's epoch from their own iteration count
            # on every __iter__; a resumed (or skipping) loader must be told the real epoch.
            batches.set_epoch(epoch)
            self.train_dataset.set_epoch(epoch)
            for batch in batches:
                with acc.accumulate(*[m for m in (self.unet, self.text_encoder)
                                      if self.trains[self._name(m)]]):
                    with acc.autocast():
                        loss = self.compute_loss(batch)
                    acc.backward(loss)
                    if not acc.sync_gradients:
                        continue
                    max_norm = t.max_grad_norm or float("inf")
                    grad_norm = float(acc.clip_grad_norm_(self.trainable, max_norm))
                    step_loss = float(acc.reduce(loss.detach(), "mean"))
                    finite = math.isfinite(step_loss) and (
                        math.isfinite(grad_norm) or t.mixed_precision == "fp16")
                    if finite or t.mixed_precision == "fp16":
                        # fp16's grad scaler skips inf/nan steps itself and lowers its scale.
                        self.optimizer.step()
                        self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.method.after_optimizer_step(self.parts, self.global_step)
                self.global_step += 1
                bar.update(1)
                if first_step_seconds is None:
                    first_step_seconds = time.perf_counter() - started
                nonfinite_streak = 0 if finite else nonfinite_streak + 1
                if not finite:
                    logger.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s); "
                                   "step skipped", self.global_step, step_loss, grad_norm)
                    if nonfinite_streak >= t.max_nonfinite_steps:
                        raise TrainingError(
                            f"loss was non-finite for {nonfinite_streak} steps in a row at step "
                            f"{self.global_step}; lower train.lr, use bf16 instead of fp16, or "
                            "check the data. The last good checkpoint is kept in "
                            f"{ckpt.checkpoint_root(self.out)}."
                        )
                row = {"step": self.global_step, "loss": step_loss,
                       "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm}
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if self.global_step % t.log_every == 0 or self.global_step == 1:
                    self._log(row)
                stop = self.global_step >= t.max_steps
                if self.validation_loss and self.global_step % v.loss_every_steps == 0:
                    stop = self._validate() or stop
                if v.prompts and v.every_steps and self.global_step % v.every_steps == 0:
                    save_validation_samples(self, self.out / "samples")
                if t.checkpoint_every and self.global_step % t.checkpoint_every == 0 \
                        and not stop:
                    self._checkpoint()
                if stop:
                    break
            epoch += 1
        bar.close()
        elapsed = time.perf_counter() - started
        steps_done = self.global_step - start_step
        if t.checkpoint_every:
            self._checkpoint()
        self._save_artifact(self.out)
        summary = {
            "step": self.global_step,
            "seconds": elapsed,
            "it_per_s": steps_done / elapsed if elapsed > 0 else None,
            "first_step_seconds": first_step_seconds,
            "best": self.best if self.best["step"] is not None else None,
        }
        if acc.is_main_process:
            ckpt.write_json_atomic(self.out / "summary.json", summary)
        acc.end_training()
        logger.info("done: %d steps in %.1fs; artifact in %s", steps_done, elapsed, self.out)
        return self.out

    def _name(self, wrapped: torch.nn.Module) -> str:
        return "unet" if wrapped is self.unet else "text_encoder"


def train(cfg: PersonalizeConfig, **kwargs) -> Path:
    """Train `cfg.method` on `cfg.data`; return the output folder with the saved artifact."""
    return Trainer(cfg, **kwargs).run()
