"""The one training loop, shared by every method, driven by accelerate.

It owns: the accelerator (training/accelerator.py), gradient accumulation, the optimizer and LR
schedule, noise and the denoising loss, a NaN/inf guard, validation (held-out loss, early
stopping, best weights, sample images), logging, checkpoints and resume. A `Method`
(personalize/methods) decides what trains, what joins the loss and what is saved.

Speed (docs/benchmarks.md): latents and, when the method leaves the text encoder frozen,
text embeddings are computed once (data/cache.py) and those encoders leave the accelerator
(training/encoders.py);
aspect-ratio buckets (data/buckets.py); the switchable fast paths of training/fastpaths.py;
and no host-device sync inside a step: the NaN guard (training/guard.py) decides on the
device and the host reads numbers only at log/check steps.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from personalize.config import PersonalizeConfig
from personalize.data import ImageCaptionDataset, load_records, split_records
from personalize.errors import TrainingError
from personalize.logs import quieted
from personalize.methods.base import Method, StepOutputs, get_method
from personalize.methods.prior import class_data_dir, uses_class_images
from personalize.models import SDParts, load_parts
from personalize.signals import StopRequest, TrainingInterrupted
from personalize.training import checkpoint as ckpt
from personalize.training import faults
from personalize.training.accelerator import cast_for_training, make_accelerator, weight_dtype
from personalize.training.data import build_dataloader, warn_long_captions
from personalize.training.encoders import EncoderInputs
from personalize.training.fastpaths import apply_fast_paths, make_optimizer
from personalize.training.guard import NonFiniteError, NonFiniteGuard
from personalize.training.noise import (
    per_example_loss,
    sample_noise,
    sample_timesteps,
    training_target,
)
from personalize.training.optimizers import eval_weights
from personalize.training.output_dir import LOG_FILE, RUN_FILE, prepare_output_dir
from personalize.training.validation import ValidationLoss, save_validation_samples

logger = logging.getLogger(__name__)


class Trainer(EncoderInputs):
    """One run: build everything from the config, then `run()`."""

    def __init__(
        self, cfg: PersonalizeConfig, method: Method | None = None, parts: SDParts | None = None
    ):
        self.created = time.perf_counter()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = make_accelerator(cfg)
        if self.accelerator.is_main_process:
            prepare_output_dir(cfg)
        # A resume path that is not a checkpoint fails here, before minutes of model loading.
        self.resume_path = ckpt.resolve_resume(cfg.output_dir, cfg.resume)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            # Every rank would repeat each line; the main process speaks for all of them.
            logging.getLogger("personalize").setLevel(logging.WARNING)
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

    # ------------------------------------------------------------------------ set up

    def _setup_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        # Never our own outputs as data: a second run would train on the first's samples.
        ours = [self.out] + ([class_data_dir(self.cfg)] if uses_class_images(self.cfg) else [])
        read = dict(
            caption_extension=d.caption_extension,
            image_column=d.image_column,
            caption_column=d.caption_column,
            strict=d.strict,
            skip=ours,
        )
        records = load_records(d.path, **read)
        if d.validation_path:
            val_records = load_records(d.validation_path, **read)
        else:
            records, val_records = split_records(records, d.validation_split, self.cfg.seed)
        captions = {str(r.image_path or r.key): r.caption for r in records if r.caption}
        if d.prompt:
            captions["data.prompt"] = d.prompt
        warn_long_captions(self.parts.tokenizer, captions)
        common = dict(
            resolution=t.resolution,
            instance_prompt=d.prompt,
            caption_fn=self.method.caption_fn(),
            seed=self.cfg.seed,
        )
        sizes = None
        if d.bucketing:
            from personalize.data.buckets import record_sizes

            sizes = record_sizes(
                records, t.resolution, d.bucket_min_size, d.bucket_max_size, d.bucket_step
            )
            logger.info(
                "aspect buckets (w x h: images): %s",
                ", ".join(f"{w}x{h}: {sizes.count((w, h))}" for w, h in sorted(set(sizes))),
            )
        self.train_dataset = ImageCaptionDataset(
            records,
            center_crop=d.center_crop,
            random_flip=d.random_flip,
            caption_dropout=d.caption_dropout,
            shuffle_tags=d.shuffle_tags,
            keep_tokens=d.keep_tokens,
            repeats=d.repeats,
            sizes=sizes,
            **common,
        )
        self.val_dataset = (
            ImageCaptionDataset(val_records, center_crop=True, **common) if val_records else None
        )
        dataset = self.method.wrap_train_dataset(self.train_dataset, self.parts, self.accelerator)
        bucket_of = None
        if sizes is not None:
            if len(dataset) != len(self.train_dataset):
                raise TrainingError(
                    f"data.bucketing=true: method {self.cfg.method} changed the number of "
                    f"training examples ({len(self.train_dataset)} -> {len(dataset)}), so "
                    "examples cannot be matched to buckets; set data.bucketing=false."
                )
            bucket_of = [sizes[i % len(records)] for i in range(len(dataset))]
        self.dataloader = build_dataloader(
            dataset,
            batch_size=t.batch_size,
            seed=self.cfg.seed,
            num_workers=d.num_workers,
            tokenizer=self.parts.tokenizer,
            bucket_of=bucket_of,
            num_processes=self.accelerator.num_processes,
            pin_memory=d.pin_memory,
        )
        self.batch_sampler = self.dataloader.batch_sampler if bucket_of is not None else None
        logger.info(
            "training on %d images (%d examples per epoch), %d held out, %d process(es)",
            len(records),
            len(dataset),
            len(val_records),
            self.accelerator.num_processes,
        )
        self._warn_small_dataset(len(dataset))

    def _warn_small_dataset(self, examples: int) -> None:
        """A batch cannot hold more examples than an epoch has: the run would silently train
        with smaller batches than train.batch_size says."""
        acc, t, d = self.accelerator, self.cfg.train, self.cfg.data
        per_process = math.ceil(examples / acc.num_processes)
        if t.batch_size > per_process and acc.is_main_process:
            logger.warning(
                "train.batch_size=%d is larger than the %d training example(s) per epoch%s, so "
                "every batch holds only %d; lower train.batch_size or raise data.repeats "
                "(now %d)",
                t.batch_size,
                examples,
                f" split over {acc.num_processes} processes" if acc.num_processes > 1 else "",
                per_process,
                d.repeats,
            )

    def _setup_modules(self, param_groups: list[dict[str, Any]]) -> None:
        acc, t = self.accelerator, self.cfg.train
        self.weight_dtype = weight_dtype(acc)
        cast_for_training(self.parts, self.weight_dtype, acc.device)
        self.trains = {
            name: any(p.requires_grad for p in m.parameters())
            for name, m in self.parts.modules().items()
        }
        apply_fast_paths(self.cfg, self.parts, self.trains, acc.device)
        for name, module in self.parts.modules().items():
            module.train(self.trains[name])
        started = time.perf_counter()
        self._setup_caches()
        self.cache_seconds = time.perf_counter() - started
        optimizer = make_optimizer(self.cfg, param_groups, acc.device)
        from diffusers.optimization import get_scheduler

        n = acc.num_processes
        lr_scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer,
            num_warmup_steps=t.lr_warmup_steps * n,
            num_training_steps=t.max_steps * n,
        )
        # Only modules that train are wrapped (DDP syncs their gradients); frozen ones are
        # used as they are.
        self.unet = acc.prepare(self.parts.unet) if self.trains["unet"] else self.parts.unet
        self.text_encoder = (
            acc.prepare(self.parts.text_encoder)
            if self.trains["text_encoder"]
            else self.parts.text_encoder
        )
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
            save_file(
                {k: v.float().cpu().contiguous() for k, v in state.items()},
                str(Path(output_dir) / ckpt.TRAINABLE_FILE),
            )
        weights.clear()

    def _load_model_hook(self, models, input_dir) -> None:
        path = Path(input_dir) / ckpt.TRAINABLE_FILE
        try:
            self.method.load_trainable_state_dict(self.parts, load_file(str(path)))
        except (ValueError, OSError, SafetensorError) as e:
            raise TrainingError(
                f"checkpoint {input_dir} does not fit this run ({self.cfg.method}): {e}. Resume "
                "it with the config it was written with, or start fresh without resume."
            ) from e
        models.clear()

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
        latents = self._batch_latents(batch, gen)
        noise = sample_noise(latents, gen, self.cfg.train.noise_offset)
        timesteps = sample_timesteps(
            latents.shape[0], sched.config.num_train_timesteps, latents.device, gen
        )
        noisy = sched.add_noise(latents, noise, timesteps)
        hidden = self._encode_text(batch["captions"], batch.get("input_ids"))
        if self.cfg.train.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        model_pred = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        target = training_target(sched, latents, noise, timesteps)
        per_example = per_example_loss(
            model_pred, target, sched, timesteps, self.cfg.train.snr_gamma
        )
        loss = self.method.reduce_loss(per_example, batch)
        outputs = StepOutputs(
            latents, noise, noisy, timesteps, hidden, model_pred, target, self.unet
        )
        extra = self.method.extra_loss(batch, outputs, self.parts)
        if extra is not None:
            loss = loss + extra
        return loss

    # ------------------------------------------------------------------------ the run

    def _resume(self) -> tuple[int, int]:
        """Load a checkpoint if asked; return (step, micro-batches to skip in its epoch)."""
        path = self.resume_path
        if path is None:
            return 0, 0
        with quieted("accelerate"):  # its per-file INFO lines; ours names the checkpoint
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
        ckpt.save_checkpoint(
            self.accelerator,
            self.out,
            self.global_step,
            {"best": self.best, "patience_used": self.patience_used},
            keep=self.cfg.train.checkpoints_total_limit,
        )

    def _save_artifact(self, out_dir: Path) -> None:
        self.accelerator.wait_for_everyone()
        # Schedule-free: save its averaged weights. Switched on every rank, so the ranks'
        # weights stay identical (the switch back is not bit-exact).
        with eval_weights(self.optimizer):
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
        stop = bool(patience and self.patience_used >= patience)
        if stop:
            logger.info(
                "early stopping at step %d: the validation loss has not improved for %d "
                "evaluations; best validation loss %.6g at step %s (weights in %s)",
                self.global_step,
                patience,
                self.best["loss"],
                self.best["step"],
                self.out / "best",
            )
        return stop

    def run(self) -> Path:
        with StopRequest() as self.stop_request:
            return self._run()

    def _stop_requested(self, at_sync_point: bool) -> int | None:
        """The signal to stop on, agreed by all processes (see personalize/signals.py)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.stop_request.signum
        if not at_sync_point:  # ranks compare flags only where they sync anyway
            return None
        flag = torch.tensor(float(self.stop_request.signum or 0), device=acc.device)
        agreed = int(acc.reduce(flag, "max"))
        return agreed or None

    def _interrupt(self, signum: int) -> None:
        self._checkpoint()
        self.accelerator.end_training()
        where = ckpt.checkpoint_root(self.out) / f"step-{self.global_step:06d}"
        raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} at step {self.global_step}; checkpoint "
            f"saved in {where}. Continue with resume=latest.",
            signum,
        )

    def _run(self) -> Path:
        acc, t, v = self.accelerator, self.cfg.train, self.cfg.validation
        self.best = {"loss": math.inf, "step": None}
        self.patience_used = 0
        self.validation_loss = (
            ValidationLoss(self.val_dataset, v.loss_timesteps, self.cfg.seed)
            if self.val_dataset is not None and v.loss_every_steps
            else None
        )
        start_step, skip = self._resume()
        if acc.is_main_process:
            ckpt.write_json_atomic(self.out / RUN_FILE, {"config": self.cfg.to_dict()})
            acc.init_trackers("personalize")
        per_epoch = len(self.dataloader)
        epoch, skip = divmod(skip, per_epoch)
        bar = tqdm(
            total=t.max_steps,
            initial=start_step,
            desc=f"train {self.cfg.method}",
            disable=not acc.is_local_main_process,
        )
        guard = NonFiniteGuard(
            self.optimizer,
            acc.device,
            max_streak=t.max_nonfinite_steps,
            check_every=min(t.log_every, t.max_nonfinite_steps),
            fp16=acc.mixed_precision == "fp16",
        )
        guard.first_unchecked_step = start_step + 1
        micro_loss = torch.zeros((), device=acc.device)
        started, first_step_seconds, first_step_done = time.perf_counter(), None, None
        stop = self.global_step >= t.max_steps
        while not stop:
            batches = acc.skip_first_batches(self.dataloader, skip) if skip else self.dataloader
            skip = 0
            # accelerate's loaders re-set the sampler's epoch from their own iteration count
            # on every __iter__; a resumed (or skipping) loader must be told the real epoch.
            batches.set_epoch(epoch)
            if self.batch_sampler is not None:  # under BatchSamplerShard accelerate can't reach it
                self.batch_sampler.set_epoch(epoch)
            self.train_dataset.set_epoch(epoch)
            for batch in batches:
                with acc.accumulate(
                    *[m for m in (self.unet, self.text_encoder) if self.trains[self._name(m)]]
                ):
                    with acc.autocast():
                        loss = self.compute_loss(batch)
                    acc.backward(loss)
                    micro_loss += loss.detach().float()
                    if not acc.sync_gradients:
                        continue
                    max_norm = t.max_grad_norm or float("inf")
                    grad_norm = acc.clip_grad_norm_(self.trainable, max_norm)
                    if grad_norm is None:  # DeepSpeed clips inside its own step
                        grad_norm = torch.zeros((), device=acc.device)
                    # A device-side all-reduce, not a host sync: every process then holds the
                    # same loss, so the guard skips the same steps everywhere.
                    step_loss = acc.reduce(micro_loss / t.gradient_accumulation_steps, "mean")
                    micro_loss = torch.zeros((), device=acc.device)
                    guard.step(step_loss, grad_norm)
                    # The LR follows the step count, skipped steps included.
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.method.after_optimizer_step(self.parts, self.global_step)
                self.global_step += 1
                bar.update(1)
                faults.error_point(f"error-rank{acc.process_index}", self.global_step)
                if first_step_seconds is None:
                    _synchronize(acc.device)  # the one sync that makes this number true
                    first_step_done = time.perf_counter()
                    first_step_seconds = first_step_done - started
                stop = self.global_step >= t.max_steps
                step = self.global_step
                log_now = step % t.log_every == 0 or step == 1 or stop
                validate_now = bool(self.validation_loss) and step % v.loss_every_steps == 0
                sample_now = bool(v.prompts and v.every_steps and step % v.every_steps == 0)
                checkpoint_now = bool(t.checkpoint_every and step % t.checkpoint_every == 0)
                sync_point = (
                    log_now
                    or stop
                    or validate_now
                    or sample_now
                    or checkpoint_now
                    or step % guard.check_every == 0
                )
                if sync_point:
                    self._check(guard, step, log_now, bar)
                signum = self._stop_requested(sync_point)
                if signum and not stop:
                    self._interrupt(signum)
                if validate_now:
                    with self._all_on_device(), eval_weights(self.optimizer):
                        stop = self._validate() or stop
                if sample_now:
                    with self._all_on_device(), eval_weights(self.optimizer):
                        save_validation_samples(self, self.out / "samples")
                if checkpoint_now and not stop:
                    self._checkpoint()
                if stop:
                    break
            epoch += 1
        bar.close()
        _synchronize(acc.device)
        ended = time.perf_counter()
        elapsed = ended - started
        steps_done = self.global_step - start_step
        if t.checkpoint_every:
            self._checkpoint()
        self._save_artifact(self.out)
        steady = (
            (steps_done - 1) / (ended - first_step_done)
            if steps_done > 1 and ended > first_step_done
            else None
        )
        summary = {
            "step": self.global_step,
            "seconds": elapsed,
            "it_per_s": steps_done / elapsed if elapsed > 0 else None,
            # Steps after the first: no warm-up, compilation or cache effects.
            "steady_it_per_s": steady,
            "first_step_seconds": first_step_seconds,
            "setup_seconds": started - self.created,
            "cache_seconds": self.cache_seconds,
            "peak_memory_bytes": _peak_memory(acc.device),
            "best": self.best if self.best["step"] is not None else None,
        }
        if acc.is_main_process:
            ckpt.write_json_atomic(self.out / "summary.json", summary)
        acc.end_training()
        logger.info("done: %d steps in %.1fs; artifact in %s", steps_done, elapsed, self.out)
        return self.out

    def _check(self, guard: NonFiniteGuard, step: int, log_now: bool, bar) -> None:
        """Read the guard's counters (the only host sync of a step) and log when due."""
        try:
            numbers = guard.check(step, log=log_now)
        except NonFiniteError as e:
            raise TrainingError(
                f"loss was non-finite for {e.args[0]} steps in a row at step {step}; lower "
                "train.lr, use bf16 instead of fp16, or check the data. The last good "
                f"checkpoint is kept in {ckpt.checkpoint_root(self.out)}."
            ) from None
        if log_now:
            row = {
                "step": step,
                "loss": numbers["loss"],
                "lr": self.lr_scheduler.get_last_lr()[0],
                "grad_norm": numbers["grad_norm"],
            }
            if numbers["skipped"]:
                row["skipped_steps"] = numbers["skipped"]
            self._log(row)
            bar.set_postfix(loss=f"{numbers['loss']:.4f}")

    def _name(self, wrapped: torch.nn.Module) -> str:
        return "unet" if wrapped is self.unet else "text_encoder"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    """Peak bytes: allocated on the GPU, or resident set size of this process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def train(cfg: PersonalizeConfig, **kwargs) -> Path:
    """Train `cfg.method` on `cfg.data`; return the output folder with the saved artifact."""
    return Trainer(cfg, **kwargs).run()
