"""personalize: teach Stable Diffusion a new subject or style from a handful of images.

from personalize import load_config, train, load
out = train(load_config("configs/lora.yaml", ["data.path=my_images"]))
pipe = load(StableDiffusionPipeline.from_pretrained(...), out)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from personalize.config import PersonalizeConfig, load_config
from personalize.errors import ConfigError, PersonalizeError
from personalize.logs import install_noise_filters

install_noise_filters()  # drops a few exact no-information messages of other libraries

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["ConfigError", "PersonalizeConfig", "PersonalizeError", "load", "load_config", "train"]
__version__ = "0.1.0"


def train(cfg: PersonalizeConfig, **kwargs: Any) -> Path:
    """Train `cfg.method`; return the output folder holding the learned artifact."""
    from personalize.training.loop import train as _train

    return _train(cfg, **kwargs)


def load(pipe: Any, path: Any, strength: float = 1.0, adapter_name: str | None = None) -> Any:
    """Load any learned artifact (LoRA, embedding, hypernetwork, pipeline) into `pipe`."""
    from personalize.inference import load as _load

    return _load(pipe, path, strength=strength, adapter_name=adapter_name)
