"""DreamBooth: fine-tune the UNet (and optionally the text encoder) on a few images of a
subject bound to a rare identifier ("a photo of sks dog"), Ruiz et al. 2023.

What trains: the whole UNet, or only the blocks named in `db.train_unet_blocks` (the
shallow ones stay as pretrained: "weight fixing"), plus the text encoder with its own LR
until `db.stop_text_encoder_training`. What joins the loss: prior preservation with class
images (training/prior.py: `instance + prior_loss_weight * class`), or a distillation prior
from a frozen copy of the original UNet, and optionally the L2-SP pull toward the
pretrained weights (training/regularizers.py). What is saved: a complete diffusers
pipeline in output_dir (`StableDiffusionPipeline.from_pretrained(output_dir)` loads it),
optionally one original-layout .safetensors file for webui/ComfyUI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from personalize.methods.base import Method
from personalize.models import SDParts
from personalize.precision import precision_dtype
from personalize.training import prior
from personalize.training.checkpoint import write_json_atomic
from personalize.training.regularizers import Regularizers, build_regularizers

logger = logging.getLogger(__name__)

PIPELINE_INDEX = "model_index.json"
_TE_STATE_KEY = "_dreambooth.text_encoder_training"


def unet_blocks(unet: torch.nn.Module) -> list[str]:
    """The UNet's top-level blocks as `db.train_unet_blocks` names them."""
    names = []
    for name, child in unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            names += [
                f"{name}.{i}" for i, c in enumerate(child) if any(True for _ in c.parameters())
            ]
        elif any(True for _ in child.parameters()):
            names.append(name)
    return names


def select_unet_params(unet: torch.nn.Module, blocks: list[str] | None) -> list[torch.nn.Parameter]:
    """Mark the UNet parameters to train: all, or those under the named (dotted) prefixes."""
    if blocks is None:
        unet.requires_grad_(True)
        return list(unet.parameters())
    named = list(unet.named_parameters())
    for block in blocks:
        if not any(n == block or n.startswith(block + ".") for n, _ in named):
            raise ValueError(
                f"db.train_unet_blocks: {block!r} names no part of this UNet; "
                f"its blocks are {', '.join(unet_blocks(unet))} (a dotted "
                "sub-path like up_blocks.1.attentions works too)"
            )
    chosen = []
    for name, p in named:
        if any(name == b or name.startswith(b + ".") for b in blocks):
            p.requires_grad_(True)
            chosen.append(p)
    return chosen


class DreamBooth(Method):
    name = "dreambooth"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.regularizers = Regularizers()

    # --- what is trainable -------------------------------------------------------------

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        db = self.cfg.db
        unet_params = select_unet_params(parts.unet, db.train_unet_blocks)
        groups = [{"params": unet_params}]
        trained = sum(p.numel() for p in unet_params)
        total = sum(p.numel() for p in parts.unet.parameters())
        logger.info(
            "DreamBooth: training %.1fM of %.1fM UNet weights%s",
            trained / 1e6,
            total / 1e6,
            f" ({', '.join(db.train_unet_blocks)})" if db.train_unet_blocks else "",
        )
        if db.train_text_encoder:
            parts.text_encoder.requires_grad_(True)
            groups.append(
                {
                    "params": list(parts.text_encoder.parameters()),
                    "lr": db.text_encoder_lr or self.cfg.train.lr,
                }
            )
        self.regularizers = build_regularizers(self.cfg, parts, adapters=False)
        return groups

    def wrap_train_dataset(self, dataset, parts: SDParts, accelerator):
        return prior.wrap_with_prior(self.cfg, dataset, parts, accelerator)

    def latent_datasets(self, dataset) -> list:
        # Prior preservation's class images, paired with the instances (training/prior.py).
        class_images = getattr(dataset, "prior", None)
        return [class_images] if class_images is not None else []

    def output_folders(self) -> list[Path]:
        return [prior.class_data_dir(self.cfg)] if prior.uses_class_images(self.cfg) else []

    def extra_captions(self) -> list[str]:
        return [self.cfg.db.class_prompt] if self.cfg.db.class_prompt else []

    # --- what is added to the loss -----------------------------------------------------

    def reduce_loss(self, per_example: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return prior.prior_preservation_loss(per_example, batch, self.cfg.db.prior_loss_weight)

    def extra_loss(self, batch, outputs, parts: SDParts) -> torch.Tensor | None:
        return self.regularizers(batch, outputs, parts) if self.regularizers else None

    def after_optimizer_step(self, parts: SDParts, step: int) -> None:
        stop = self.cfg.db.stop_text_encoder_training
        if stop is not None and step >= stop and self._text_encoder_training(parts):
            self._freeze_text_encoder(parts)
            logger.info("text encoder frozen after %d steps (db.stop_text_encoder_training)", step)

    def _text_encoder_training(self, parts: SDParts) -> bool:
        return any(p.requires_grad for p in parts.text_encoder.parameters())

    def _freeze_text_encoder(self, parts: SDParts) -> None:
        # Its parameters then get no gradient, which AdamW skips (no update, no decay).
        parts.text_encoder.requires_grad_(False)
        parts.text_encoder.train(False)

    # --- checkpoints -------------------------------------------------------------------

    def _trainable_params(self, parts: SDParts) -> dict[str, torch.nn.Parameter]:
        """The trained weights, by name; the text encoder's also after it was frozen."""
        out = {}
        for module_name, module in (("unet", parts.unet), ("text_encoder", parts.text_encoder)):
            everything = module_name == "text_encoder" and self.cfg.db.train_text_encoder
            for name, p in module.named_parameters():
                if p.requires_grad or everything:
                    out[f"{module_name}.{name}"] = p
        return out

    def trainable_state_dict(self, parts: SDParts) -> dict[str, torch.Tensor]:
        state = {k: p.detach().contiguous() for k, p in self._trainable_params(parts).items()}
        if self.cfg.db.train_text_encoder:
            # Whether the text encoder still trains is state too: a run resumed after
            # stop_text_encoder_training must not train it for one more step.
            state[_TE_STATE_KEY] = torch.tensor(float(self._text_encoder_training(parts)))
        return state

    def load_trainable_state_dict(self, parts: SDParts, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        te_training = state.pop(_TE_STATE_KEY, None)
        params = self._trainable_params(parts)
        missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                "checkpoint does not match this run's trainable weights "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); was it written with "
                "other db.train_unet_blocks / db.train_text_encoder settings?"
            )
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)
        if te_training is not None and not bool(te_training) and self._text_encoder_training(parts):
            self._freeze_text_encoder(parts)

    # --- what is saved -----------------------------------------------------------------

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        out_dir = Path(out_dir)
        db = self.cfg.db
        trained = {"unet"} | ({"text_encoder"} if db.train_text_encoder else set())
        dtype = precision_dtype(db.save_precision)
        states = save_pipeline(
            out_dir,
            parts,
            trained=trained,
            dtype=dtype,
            copy_untouched=self.cfg.model.variant is None,
        )
        write_json_atomic(
            out_dir / "dreambooth.json",
            {
                "step": step,
                "base_model": parts.source,
                "instance_prompt": self.cfg.data.prompt,
                "class_prompt": db.class_prompt,
                "trained": sorted(trained),
                "train_unet_blocks": db.train_unet_blocks,
            },
        )
        if db.save_single_file:
            save_single_file(
                out_dir / f"{Path(self.cfg.output_dir).name}.safetensors",
                out_dir,
                parts,
                states,
                dtype,
                step,
            )
        return out_dir

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        return {
            "train": {"lr": 2e-4},
            "db": {
                "with_prior_preservation": True,
                "class_prompt": "a photo of a disc",
                "num_class_images": 8,
                "class_num_inference_steps": 10,
                "sample_batch_size": 4,
            },
        }


# ------------------------------------------------------------------------------ saving


def _replace_dir(tmp: Path, final: Path) -> None:
    from personalize.io import make_readable

    make_readable(tmp)  # diffusers' safetensors files are 0600; a UI may run as another user
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _tmp_dir(out_dir: Path, name: str) -> Path:
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _local_pipeline_dir(source: str) -> Path | None:
    path = Path(source) if source else None
    return path if path is not None and (path / PIPELINE_INDEX).is_file() else None


def _module_state(
    module: torch.nn.Module, subfolder: str, source: Path | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The module's weights in `dtype`. Frozen weights that training held in a lower
    precision (train_unet_blocks with mixed precision) are taken from the original files
    instead, so the saved model does not carry the rounding of its untouched blocks."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    rounded = [k for k in frozen if state[k].dtype not in (torch.float32, torch.float64)]
    if rounded and source is not None:
        original = type(module).from_pretrained(source, subfolder=subfolder).state_dict()
        for k in rounded:
            state[k] = original[k]
    elif rounded:
        logger.warning(
            "%s: %d frozen tensors were held in %s during training and are saved "
            "from there (the base model is not a local folder to copy them from)",
            subfolder,
            len(rounded),
            state[rounded[0]].dtype,
        )
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).cpu().contiguous()
        for k, v in state.items()
    }


def _save_model(module: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Config + one safetensors file, the names `from_pretrained` looks for."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
        weights = "diffusion_pytorch_model.safetensors"
    else:  # transformers
        module.config.save_pretrained(folder)
        weights = "model.safetensors"
    save_file(state, str(folder / weights), metadata={"format": "pt"})


def _inference_scheduler(parts: SDParts, source: Path | None):
    """The base model's own sampling scheduler when it is a local folder, else DDIM."""
    import diffusers

    config_file = source / "scheduler" / "scheduler_config.json" if source else None
    if config_file is not None and config_file.is_file():
        name = json.loads(config_file.read_text()).get("_class_name", "")
        cls = getattr(diffusers, name, None)
        if cls is not None:
            return cls.from_pretrained(source, subfolder="scheduler")
    return diffusers.DDIMScheduler.from_config(parts.noise_scheduler.config)


def save_pipeline(
    out_dir: Path,
    parts: SDParts,
    *,
    trained: set[str],
    dtype: torch.dtype,
    copy_untouched: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Write a complete diffusers pipeline into `out_dir`; return the saved weights.

    Each component is written under a temporary name and renamed into place, and
    model_index.json (what marks a folder as a pipeline) is removed first and written last:
    a run killed mid-save never leaves a folder that looks complete. Components that did not
    train are copied byte for byte from a local base model (their original precision)."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PIPELINE_INDEX).unlink(missing_ok=True)
    source = _local_pipeline_dir(parts.source)
    scheduler = _inference_scheduler(parts, source)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name in ("unet", "text_encoder", "vae"):
        module = getattr(parts, name)
        tmp = _tmp_dir(out_dir, name)
        if (
            name not in trained
            and copy_untouched
            and source is not None
            and (source / name).is_dir()
        ):
            shutil.copytree(source / name, tmp)
        else:
            states[name] = _module_state(module, name, source, dtype)
            _save_model(module, states[name], tmp)
        _replace_dir(tmp, out_dir / name)
    for name, component in (("tokenizer", parts.tokenizer), ("scheduler", scheduler)):
        tmp = _tmp_dir(out_dir, name)
        component.save_pretrained(tmp)
        _replace_dir(tmp, out_dir / name)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = _tmp_dir(out_dir, "index")
    pipe.save_config(tmp)
    os.replace(tmp / PIPELINE_INDEX, out_dir / PIPELINE_INDEX)
    shutil.rmtree(tmp)
    logger.info(
        "saved the fine-tuned pipeline in %s (trained: %s)", out_dir, ", ".join(sorted(trained))
    )
    return states


def save_single_file(
    path: Path,
    pipeline_dir: Path,
    parts: SDParts,
    states: dict[str, dict[str, torch.Tensor]],
    dtype: torch.dtype,
    step: int,
) -> Path:
    """The saved pipeline as one original-layout (SD 1.x) .safetensors checkpoint."""
    from personalize.adapters.formats import atomic_save_safetensors
    from personalize.adapters.sd_single_file import to_original_sd

    states = dict(states)
    for name in ("unet", "vae", "text_encoder"):
        if name not in states:
            # Copied from the base model: read back what the pipeline folder holds.
            module = type(getattr(parts, name)).from_pretrained(pipeline_dir / name)
            states[name] = module.state_dict()
            del module
    tensors = to_original_sd(
        parts.unet.config, parts.vae.config, parts.text_encoder.config, states, dtype
    )
    metadata = {
        "format": "pt",
        "personalize_method": "dreambooth",
        "personalize_step": str(step),
        "personalize_base_model": parts.source,
    }
    atomic_save_safetensors(tensors, path, metadata)
    logger.info("saved the single-file checkpoint %s", path)
    return path
