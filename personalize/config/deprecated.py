"""Old config keys, still accepted: `db.*`, `ti.*` and `hn.*` before the sections were named
for what they configure. `translate` rewrites a raw config mapping to the new keys and
returns the renames, which `load_config`/`from_dict` log once per run."""

from __future__ import annotations

import logging
from typing import Any

from personalize.errors import ConfigError

logger = logging.getLogger(__name__)

# The old `db` section held prior preservation, L2-SP and the DreamBooth-only options.
DB_KEYS: dict[str, str] = {
    "with_prior_preservation": "prior.enabled",
    "prior": "prior.kind",
    "class_prompt": "prior.class_prompt",
    "class_data_dir": "prior.class_data_dir",
    "num_class_images": "prior.num_class_images",
    "prior_loss_weight": "prior.loss_weight",
    "distillation_weight": "prior.distillation_weight",
    "sample_batch_size": "prior.generation_batch_size",
    "class_num_inference_steps": "prior.generation_steps",
    "class_guidance_scale": "prior.generation_guidance_scale",
    "class_precision": "prior.generation_precision",
    "weight_constraint": "regularization.weight_constraint",
    "weight_constraint_lambda": "regularization.weight_constraint_lambda",
    "weight_constraint_anchor": "regularization.weight_constraint_anchor",
    "train_text_encoder": "dreambooth.train_text_encoder",
    "text_encoder_lr": "dreambooth.text_encoder_lr",
    "stop_text_encoder_training": "dreambooth.stop_text_encoder_training",
    "train_unet_blocks": "dreambooth.train_unet_blocks",
    "save_single_file": "dreambooth.save_single_file",
    "save_precision": "dreambooth.save_precision",
}
# Sections renamed as a whole (their keys kept their names).
RENAMED_SECTIONS = {"ti": "textual_inversion", "hn": "hypernetwork"}


def new_key(old: str) -> str | None:
    """`db.prior_loss_weight` -> `prior.loss_weight`; None for a key that is not an old one."""
    section, _, key = old.partition(".")
    if section == "db":
        return DB_KEYS.get(key)
    if section in RENAMED_SECTIONS and key:
        return f"{RENAMED_SECTIONS[section]}.{key}"
    return None


def translate(data: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """`data` with every old key moved to its new place, and the (old, new) renames made.
    An old and a new key that both set the same option to different values is an error."""
    old_sections = [s for s in ("db", *RENAMED_SECTIONS) if s in data]
    if not old_sections:
        return data, []
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    renames: list[tuple[str, str]] = []
    for section in old_sections:
        values = out.pop(section)
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of options, got {values!r}")
        unknown = sorted(k for k in values if section == "db" and k not in DB_KEYS)
        if unknown:
            raise ConfigError(
                f"unknown config key(s): {', '.join('db.' + k for k in unknown)}. The db "
                "section is deprecated; its keys moved to prior, regularization and dreambooth "
                "(docs/dreambooth.md)"
            )
        for key, value in values.items():
            target = new_key(f"{section}.{key}")
            assert target is not None  # db keys were checked above; ti/hn map every key
            new_section, new_name = target.split(".", 1)
            node = out.setdefault(new_section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{new_section}: expected a mapping of options, got {node!r}")
            if new_name in node and node[new_name] != value:
                raise ConfigError(
                    f"{section}.{key} (deprecated) and {target} are both set, to different "
                    f"values ({value!r}, {node[new_name]!r}); keep only {target}"
                )
            node[new_name] = value
            renames.append((f"{section}.{key}", target))
    return out, renames


def log_renames(renames: list[tuple[str, str]]) -> None:
    """The one deprecation line of a run: every old key used, and its new name."""
    if renames:
        pairs = ", ".join(f"{old} -> {new}" for old, new in dict(renames).items())
        logger.warning("deprecated config keys (they still work; please rename): %s", pairs)
