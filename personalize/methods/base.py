"""The Method interface: what a personalization method adds to the one training loop.

Every method answers three questions (see docs/architecture.md): what is trainable,
what is added to the loss, and what is saved in which format. The loop owns
everything else (accelerate, precision, accumulation, optimizer, noise, checkpoints,
validation, logging), so a new method never needs a new loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from personalize.config import PersonalizeConfig
from personalize.errors import ConfigError
from personalize.models import SDParts

# A parameter attribute: the method's own trainable_state_dict leaves it out, because a
# helper saves (part of) it under its own key (methods/pivotal.py).
SAVED_APART = "_personalize_saved_apart"


@dataclass
class StepOutputs:
    """What the loop computed for one micro-batch, handed to `Method.extra_loss`."""

    latents: torch.Tensor
    noise: torch.Tensor
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    encoder_hidden_states: torch.Tensor
    model_pred: torch.Tensor
    target: torch.Tensor
    unet: torch.nn.Module  # the (possibly DDP-wrapped) UNet used for the forward pass
    # Further UNet inputs of the model family (SDXL: added_cond_kwargs with the pooled
    # embedding and size/crop ids): a regularizer calling the UNet again passes them too.
    unet_kwargs: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class with the defaults every method shares; subclasses override what differs."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: PersonalizeConfig):
        self.cfg = cfg

    # --- what is trainable -------------------------------------------------------------

    def setup(self, parts: SDParts) -> list[dict[str, Any]]:
        """Freeze/unfreeze modules, add tokens or adapters; return optimizer param groups."""
        raise NotImplementedError

    def caption_fn(self) -> Callable[[str], str] | None:
        """A function applied to every training caption (e.g. TI's templates), or None."""
        return None

    def wrap_train_dataset(
        self, dataset: torch.utils.data.Dataset, parts: SDParts, accelerator
    ) -> torch.utils.data.Dataset:
        """Return the dataset the loop trains on. DreamBooth pairs each instance example with a
        class example here: an item may carry `"prior": {"pixel_values", "caption"}`, and the
        loop's collate appends those after the instance examples and marks them in
        `batch["is_prior"]`."""
        return dataset

    def latent_datasets(self, dataset: torch.utils.data.Dataset) -> list[torch.utils.data.Dataset]:
        """Datasets besides the training images whose examples `dataset` (what
        `wrap_train_dataset` returned) shows, so the loop may cache their latents too
        (prior preservation's class images)."""
        return []

    def output_folders(self) -> list[Path]:
        """Folders the method writes besides output_dir (generated class images): never read
        as training data, or a second run would train on the first one's images."""
        return []

    # --- captions and prompts ----------------------------------------------------------

    def training_prompt(self, prompt: str | None) -> str | None:
        """The instance prompt for images without a caption, given data.prompt (TI's object
        and style runs need none: their templates replace every caption)."""
        return prompt

    def validation_prompts(self, prompts: list[str]) -> list[str]:
        """The prompts sample grids are drawn with, given validation.prompts (TI: `{}` is
        the placeholder)."""
        return list(prompts)

    def extra_captions(self) -> list[str]:
        """Captions the method shows the text encoder besides the data's (prior
        preservation's class prompt), so a text-embedding cache can hold them too."""
        return []

    # --- what is added to the loss -----------------------------------------------------

    def reduce_loss(self, per_example: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """Combine per-example losses into the batch loss (DreamBooth weighs class examples)."""
        return per_example.mean()

    def extra_loss(
        self, batch: dict[str, Any], outputs: StepOutputs, parts: SDParts
    ) -> torch.Tensor | None:
        """A regularizer added to the denoising loss (weight constraint, distillation), or None."""
        return None

    def check_before_training(self, parts: SDParts) -> None:
        """Raise if something since `setup` undid what it set up (the hypernetwork's
        attention processors replaced); the loop calls it once, before the first step."""

    def after_optimizer_step(self, parts: SDParts, step: int) -> None:
        """Runs after each optimizer step; `step` is the number of finished steps (1 after
        the first). E.g. TI restores every embedding row but its own."""

    # --- what is saved -----------------------------------------------------------------

    def save(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        """Write the learned artifact where loaders expect it; return its path."""
        raise NotImplementedError

    def save_every(self) -> int:
        """Steps between intermediate artifacts the loop saves with `save_intermediate`
        (0: only the final one)."""
        return 0

    def save_intermediate(self, out_dir: Path, parts: SDParts, step: int) -> Path:
        """The artifact after `step` steps, kept beside the final one (main process only)."""
        return self.save(Path(out_dir) / f"step-{step:06d}", parts, step)

    def trainable_state_dict(self, parts: SDParts) -> dict[str, torch.Tensor]:
        """Everything a checkpoint must hold to resume: all parameters that require grad."""
        return {k: p.detach().contiguous() for k, p in self._saved_parameters(parts).items()}

    def _saved_parameters(self, parts: SDParts) -> dict[str, torch.nn.Parameter]:
        """The parameters that require grad, by checkpoint key, but those marked with
        SAVED_APART (pivotal tuning's embedding table: only its new rows are state)."""
        params = {}
        for module_name, module in parts.modules().items():
            for name, p in module.named_parameters():
                if p.requires_grad and not getattr(p, SAVED_APART, False):
                    params[f"{module_name}.{name}"] = p
        return params

    def load_trainable_state_dict(self, parts: SDParts, state: dict[str, torch.Tensor]) -> None:
        expected = self._saved_parameters(parts)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                "checkpoint does not match this run's trainable weights "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}); "
                "was it written by another method or config?"
            )
        wrong = [
            f"{k} {list(state[k].shape)} != {list(v.shape)}"
            for k, v in expected.items()
            if state[k].shape != v.shape
        ]
        if wrong:  # e.g. another lora.rank: copy_ would only say "size of tensor a (8) ..."
            raise ConfigError(
                f"checkpoint weights have other shapes than this run's ({wrong[:3]}); was it "
                "written with another config (e.g. lora.rank) or base model?"
            )
        modules = parts.modules()
        with torch.no_grad():
            for key, value in state.items():
                module_name, pname = key.split(".", 1)
                modules[module_name].get_parameter(pname).copy_(value)

    # --- the demo ----------------------------------------------------------------------

    @classmethod
    def demo_overrides(cls) -> dict[str, Any]:
        """Config values that make `personalize demo --method NAME` learn in ~a minute on CPU."""
        return {}

    @classmethod
    def toy_world_recipe(
        cls, identifier: str, class_word: str, unet_config: dict[str, Any]
    ) -> dict[str, Any]:
        """This method on the toy world (personalize.toyworld), for `personalize demo` and
        the quality benchmark: `{"steps": N, "config": {...}}`, the optimizer steps after
        which the subject shows in the samples, and the config that names the subject this
        method's way ("a sks heart" by default). `unet_config`: the toy model's UNet config."""
        return {"steps": 600, "config": {"data": {"prompt": f"a {identifier} {class_word}"}}}


def get_method(name: str) -> type[Method]:
    """The Method class for `name`, imported lazily so one method's deps don't load the rest."""
    import importlib

    module = importlib.import_module(f"personalize.methods.{name}")
    for obj in vars(module).values():
        if isinstance(obj, type) and issubclass(obj, Method) and obj.name == name:
            return obj
    raise ConfigError(f"no Method named {name!r} in personalize.methods.{name}")
