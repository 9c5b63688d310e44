"""The one training loop, shared by every method, driven by accelerate.

It owns: the accelerator (training/accelerator.py), gradient accumulation, the optimizer and LR
schedule, noise and the denoising loss, a NaN/inf guard, validation (held-out loss, early
stopping, best weights, sample images), logging, checkpoints, periodic artifacts and resume.
A `Method` (personalize/methods) decides what trains, what joins the loss and what is saved;
`Conditioning` (training/conditioning.py) turns a batch into latents and text conditioning.

Speed (docs/benchmarks.md): latents and, when the method leaves the text encoder frozen,
text embeddings are computed once (data/cache.py) and those encoders leave the accelerator;
aspect-ratio buckets (data/buckets.py); the switchable fast paths of training/fastpaths.py;
and no host-device sync inside a step: the NaN guard (training/guard.py) decides on the
device and the host reads numbers only at log/check steps.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from personalize.config import PersonalizeConfig
from personalize.errors import TrainingError
from personalize.methods.base import Method, StepOutputs, get_method
from personalize.models import SDParts, load_parts
from personalize.signals import StopRequest, TrainingInterrupted
from personalize.training import checkpoint as ckpt
from personalize.training import faults, sharding
from personalize.training.accelerator import cast_for_training, make_accelerator, weight_dtype
from personalize.training.conditioning import CacheSettings, Conditioning
from personalize.training.data import build_training_data
from personalize.training.ema import EMA_FILE, ema_only, evaluation_weights, make_ema
from personalize.training.fastpaths import apply_fast_paths, make_optimizer
from personalize.training.guard import NonFiniteError, NonFiniteGuard
from personalize.training.noise import add_training_noise, per_example_loss, training_target
from personalize.training.optimizers import make_lr_scheduler
from personalize.training.output_dir import LOG_FILE, RUN_FILE, prepare_output_dir
from personalize.training.progress import Progress
from personalize.training.schedule import Due, Schedule
from personalize.training.timer import RunTimer, peak_memory
from personalize.training.validation import (
    EarlyStopping,
    ValidationLoss,
    save_validation_samples,
)

logger = logging.getLogger(__name__)


class Trainer:
    """One run: build everything from the config, then `run()`."""

    def __init__(
        self, cfg: PersonalizeConfig, method: Method | None = None, parts: SDParts | None = None
    ):
        self.timer = RunTimer()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = acc = make_accelerator(cfg)
        sharding.check_fsdp_config(cfg, acc)  # before minutes of model loading
        if acc.is_main_process:
            prepare_output_dir(cfg)
        # A resume path that is not a checkpoint fails here, before minutes of model loading.
        self.resume_path = ckpt.resolve_resume(cfg.output_dir, cfg.resume)
        acc.wait_for_everyone()
        if not acc.is_main_process:
            # Every rank would repeat each line; the main process speaks for all of them.
            logging.getLogger("personalize").setLevel(logging.WARNING)
        set_seed(cfg.seed)
        m = cfg.model
        self.parts = parts or load_parts(
            m.path, m.revision, m.variant, m.prediction_type, vae_path=m.vae_path
        )
        self.method = method or get_method(cfg.method)(cfg)
        for module in self.parts.modules().values():
            module.requires_grad_(False)
        param_groups = self.method.setup(self.parts)
        self.trainable = [p for g in param_groups for p in g["params"]]
        if not self.trainable:
            raise TrainingError(f"method {cfg.method} left nothing trainable")
        data = build_training_data(
            cfg, self.method, self.parts, acc, self.method.training_prompt(cfg.data.prompt)
        )
        self.train_dataset, self.val_dataset = data.train_dataset, data.val_dataset
        self.dataloader, self.batch_sampler = data.dataloader, data.batch_sampler
        self._setup_modules(param_groups, data)
        v, t = cfg.validation, cfg.train
        self.validation_prompts = self.method.validation_prompts(v.prompts)
        self.validation_loss = (
            ValidationLoss(
                self.val_dataset,
                v.loss_timesteps,
                cfg.seed,
                mask_weighting=(cfg.data.unmasked_weight, cfg.data.normalize_masked_loss),
            )
            if self.val_dataset is not None and v.loss_every_steps
            else None
        )
        self.guard = NonFiniteGuard(
            self.optimizer,
            acc.device,
            max_streak=t.max_nonfinite_steps,
            check_every=min(t.log_every, t.max_nonfinite_steps),
            fp16=acc.mixed_precision == "fp16",
        )
        self.schedule = Schedule(
            max_steps=t.max_steps,
            log_every=t.log_every,
            validate_every=v.loss_every_steps if self.validation_loss else 0,
            sample_every=v.every_steps if self.validation_prompts else 0,
            save_every=self.method.save_every(),
            checkpoint_every=t.checkpoint_every,
            check_guard_every=self.guard.check_every,
        )
        self.global_step = 0
        self.early = EarlyStopping(t.early_stopping_patience, self.out / "best")
        self.micro_loss = torch.zeros((), device=acc.device)  # summed over accumulation
        self.progress = Progress(acc, self.out / LOG_FILE)
        self.stop_request = StopRequest()

    # ------------------------------------------------------------------------ set up

    def _setup_modules(self, param_groups: list[dict[str, Any]], data) -> None:
        acc, d = self.accelerator, self.cfg.data
        cast_for_training(self.parts, weight_dtype(acc), acc.device)
        self.trains = {
            name: any(p.requires_grad for p in m.parameters())
            for name, m in self.parts.modules().items()
        }
        apply_fast_paths(self.cfg, self.parts, self.trains, acc.device)
        for name, module in self.parts.modules().items():
            module.train(self.trains[name])  # dropout only where something learns
        self.conditioning = Conditioning(
            self.parts,
            acc,
            trains=self.trains,
            cache=CacheSettings(
                latents=d.cache_latents,
                text=d.cache_text_embeddings,
                folder=Path(d.cache_dir) if d.cache_dir else self.out / "cache",
            ),
            datasets=[data.train_dataset, *self.method.latent_datasets(data.dataset)],
            fixed_captions=data.fixed_captions,
        )
        optimizer = make_optimizer(self.cfg, param_groups, acc.device)
        lr_scheduler = make_lr_scheduler(self.cfg, optimizer, acc.num_processes)
        trained = {name: m for name, m in self.parts.modules().items() if self.trains[name]}
        trained, self.optimizer, self.dataloader, self.lr_scheduler = sharding.prepare_modules(
            acc,
            trained,
            optimizer,
            self.dataloader,
            lr_scheduler,
            report_dir=self.out / "logs",
            micro_batch_size=self.cfg.train.batch_size,
        )
        if sharding.is_fsdp(acc):  # the optimizer holds new (sharded) parameters: clip those
            self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.unet = trained.get("unet", self.parts.unet)
        self.text_encoder = trained.get("text_encoder", self.parts.text_encoder)
        for name in self.parts.text_encoders():  # SDXL has two
            if name in trained:
                self.conditioning.use_wrapped_text_encoder(trained[name], name)
        self.trained_modules = list(trained.values())
        ckpt.TrainableState(acc, self.method, self.parts)  # what checkpoints hold
        # After TrainableState: the EMA's own checkpoint hooks come second.
        self.ema = make_ema(self.cfg, self.trainable, acc, self.method, self.parts)

    # ------------------------------------------------------------------------ one step

    def _step_generator(self) -> torch.Generator:
        # Noise and timesteps come from (seed, step, rank) alone, so a resumed run draws
        # exactly what an uninterrupted one would.
        g = torch.Generator(device=self.accelerator.device)
        g.manual_seed(
            self.cfg.seed * 1_000_003 + self.global_step * 101 + self.accelerator.process_index
        )
        return g

    def compute_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        sched = self.parts.noise_scheduler
        gen = self._step_generator()
        latents = self.conditioning.latents(batch, gen)
        noise, timesteps, noisy = add_training_noise(
            sched, latents, gen, self.cfg.train.noise_offset
        )
        text = self.conditioning.text(
            batch["captions"], batch.get("input_ids"), time_ids=self.conditioning.time_ids(batch)
        )
        if self.cfg.train.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        model_pred = self.unet(
            noisy, timesteps, text.hidden_states, **text.unet_kwargs, return_dict=False
        )[0]
        target = training_target(sched, latents, noise, timesteps)
        d = self.cfg.data
        per_example = per_example_loss(
            model_pred,
            target,
            sched,
            timesteps,
            self.cfg.train.snr_gamma,
            mask=batch.get("loss_mask"),  # data.masked_loss; class images' rows are ones
            unmasked_weight=d.unmasked_weight,
            normalize_mask=d.normalize_masked_loss,
        )
        loss = self.method.reduce_loss(per_example, batch)
        outputs = StepOutputs(
            latents,
            noise,
            noisy,
            timesteps,
            text.hidden_states,
            model_pred,
            target,
            self.unet,
            text.unet_kwargs,
        )
        extra = self.method.extra_loss(batch, outputs, self.parts)
        if extra is not None:
            loss = loss + extra
        return loss

    def _train_step(self, batch: dict[str, Any]) -> bool:
        """Forward and backward one micro-batch; at the end of an accumulation, clip and
        step the optimizer (the guard skips a non-finite step). True when a step finished."""
        acc, t = self.accelerator, self.cfg.train
        with acc.accumulate(*self.trained_modules):
            with acc.autocast():
                loss = self.compute_loss(batch)
            acc.backward(loss)
            self.micro_loss += loss.detach().float()
            if not acc.sync_gradients:
                return False
            grad_norm = acc.clip_grad_norm_(self.trainable, t.max_grad_norm or float("inf"))
            if grad_norm is None:  # DeepSpeed clips inside its own step
                grad_norm = torch.zeros((), device=acc.device)
            # A device-side all-reduce, not a host sync: every process then holds the same
            # loss, so the guard skips the same steps everywhere.
            step_loss = acc.reduce(self.micro_loss / t.gradient_accumulation_steps, "mean")
            self.micro_loss = torch.zeros((), device=acc.device)
            self.guard.step(step_loss, grad_norm)
            # The LR follows the step count, skipped steps included.
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return True

    # ------------------------------------------------------------------------ the run

    def run(self) -> Path:
        with self.stop_request:  # SIGINT/SIGTERM: checkpoint after this step, then stop
            return self._run()

    def _run(self) -> Path:
        start_step, skip = self._resume()
        self.method.check_before_training(self.parts)
        self._start()
        if self.global_step < self.cfg.train.max_steps:
            for batch in self._batches(skip):
                if not self._train_step(batch):
                    continue  # accumulating
                self.global_step += 1
                self.method.after_optimizer_step(self.parts, self.global_step)
                if self.ema is not None:  # after the method's fix-ups (TI's frozen rows)
                    self.ema.update()
                self.progress.step_done()
                faults.error_point(f"error-rank{self.accelerator.process_index}", self.global_step)
                self.timer.step_done()
                if self._after_step(self.schedule.at(self.global_step)):
                    break
        return self._finish(start_step)

    def _batches(self, skip: int):
        """Micro-batches from where the run stands on, epoch after epoch (`skip`: the
        micro-batches a resumed run already trained on since the start of training)."""
        epoch, skip = divmod(skip, len(self.dataloader))
        while True:
            acc = self.accelerator
            batches = acc.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            skip = 0
            # accelerate's loaders re-set the sampler's epoch from their own iteration count
            # on every __iter__; a resumed (or skipping) loader must be told the real epoch.
            batches.set_epoch(epoch)
            if self.batch_sampler is not None:  # under BatchSamplerShard accelerate can't reach it
                self.batch_sampler.set_epoch(epoch)
            self.train_dataset.set_epoch(epoch)
            yield from batches
            epoch += 1

    def _after_step(self, due: Due) -> bool:
        """Do what is due after a step; True when training should stop."""
        step = self.global_step
        if due.save:
            # Before the stop check: an interrupted run resumes after this step.
            with ema_only(self.ema), sharding.full_weights(self.accelerator, self.trained_modules):
                if self.accelerator.is_main_process:
                    self.method.save_intermediate(self.out, self.parts, step)
        if due.sync_point:
            self._check(step, due.log)
        signum = self.stop_request.agreed(self.accelerator, due.sync_point)
        if signum and not due.stop:
            self._interrupt(signum)
        stop = due.stop
        if due.validate:
            with self.conditioning.all_on_device(), self._evaluation_weights():
                stop = self._validate() or stop
        if due.sample:
            with self.conditioning.all_on_device(), self._evaluation_weights():
                save_validation_samples(
                    self.parts,
                    self.accelerator,
                    self.cfg.validation,
                    self.validation_prompts,
                    resolution=self.cfg.train.resolution,
                    step=step,
                    folder=self.out / "samples",
                )
        if due.checkpoint and not stop:
            self._checkpoint()
        return stop

    def _resume(self) -> tuple[int, int]:
        """Load a checkpoint if asked; return (step, micro-batches already trained on)."""
        path = self.resume_path
        if path is None:
            return 0, 0
        try:
            state = ckpt.resume_from(self.accelerator, path, self.out / LOG_FILE)
        except ckpt.CheckpointMismatch as e:
            raise TrainingError(
                f"checkpoint {path} does not fit this run ({self.cfg.method}): {e}. Resume it "
                "with the config it was written with, or start fresh without resume."
            ) from e.__cause__
        self.global_step = int(state["step"])
        self.early.load_state(state)
        if self.ema is None and (path / EMA_FILE).is_file():
            logger.warning(
                "%s holds an EMA of the weights, but train.ema_decay is off: the raw weights "
                "train on and are saved; set train.ema_decay as before to keep the EMA",
                path,
            )
        logger.info("resumed from %s at step %d", path, self.global_step)
        return self.global_step, self.global_step * self.cfg.train.gradient_accumulation_steps

    def _start(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.write_json_atomic(self.out / RUN_FILE, {"config": self.cfg.to_dict()})
            acc.init_trackers("personalize")
        self.guard.first_unchecked_step = self.global_step + 1
        self.progress.start(self.cfg.train.max_steps, self.global_step, f"train {self.cfg.method}")
        self.timer.start(acc.device)

    def _finish(self, start_step: int) -> Path:
        acc = self.accelerator
        self.progress.close()
        self.timer.stop()
        steps_done = self.global_step - start_step
        if self.cfg.train.checkpoint_every:
            self._checkpoint()
        self._save_artifact(self.out)
        summary = {
            "step": self.global_step,
            **self.timer.summary(steps_done),
            "cache_seconds": self.conditioning.setup_seconds,
            "peak_memory_bytes": peak_memory(acc.device),
            "best": self.early.best if self.early.best["step"] is not None else None,
        }
        if acc.is_main_process:
            ckpt.write_json_atomic(self.out / "summary.json", summary)
        acc.end_training()
        logger.info(
            "done: %d steps in %.1fs; artifact in %s", steps_done, self.timer.seconds, self.out
        )
        return self.out

    # ------------------------------------------------------------------------ what is due

    def _check(self, step: int, log_now: bool) -> None:
        """Read the guard's counters (the only host sync of a step) and log when due."""
        try:
            numbers = self.guard.check(step, log=log_now)
        except NonFiniteError as e:
            raise TrainingError(
                f"loss was non-finite for {e.args[0]} steps in a row at step {step}; lower "
                "train.lr, use bf16 instead of fp16, or check the data. The last good "
                f"checkpoint is kept in {ckpt.checkpoint_root(self.out)}."
            ) from None
        if log_now:
            self.progress.log_training(step, numbers, self.lr_scheduler.get_last_lr()[0])

    def _interrupt(self, signum: int) -> None:
        self._checkpoint()
        self.accelerator.end_training()
        where = ckpt.checkpoint_root(self.out) / f"step-{self.global_step:06d}"
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} at step {self.global_step}; checkpoint "
            f"saved in {where}. Continue with resume=latest.",
            signum,
        )

    def _validate(self) -> bool:
        """Held-out loss; keeps the best weights; returns True when early stopping says to stop."""
        val = self.validation_loss.compute(self.unet, self.conditioning, self.parts.noise_scheduler)
        self.progress.log({"step": self.global_step, "val_loss": val})
        if self.early.record(val, self.global_step):
            self._save_artifact(self.out / "best")
            if self.accelerator.is_main_process:
                ckpt.write_json_atomic(self.out / "best" / "best.json", self.early.best)
        return self.early.should_stop

    def _checkpoint(self) -> None:
        ckpt.save_checkpoint(
            self.accelerator,
            self.out,
            self.global_step,
            self.early.state(),
            keep=self.cfg.train.checkpoints_total_limit,
        )

    def _evaluation_weights(self):
        """What validation, samples and artifacts use (training/ema.py)."""
        return evaluation_weights(self.optimizer, self.ema)

    def _save_artifact(self, out_dir: Path) -> None:
        self.accelerator.wait_for_everyone()
        # The EMA, or schedule-free's averaged weights. Switched on every rank, so the
        # ranks' weights stay identical (schedule-free's switch back is not bit-exact).
        with (
            self._evaluation_weights(),
            sharding.full_weights(self.accelerator, self.trained_modules),
        ):
            if self.accelerator.is_main_process:
                self.method.save(out_dir, self.parts, self.global_step)
            self.accelerator.wait_for_everyone()


def train(cfg: PersonalizeConfig, **kwargs) -> Path:
    """Train `cfg.method` on `cfg.data`; return the output folder with the saved artifact."""
    return Trainer(cfg, **kwargs).run()
