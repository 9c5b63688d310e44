"""Config sections named for what they configure, each with its own `check(cfg)`.

`prior` (prior preservation) and `regularization` (the L2-SP weight constraint) are read
by both `method: dreambooth` and `method: lora`; `dreambooth`, `lora`,
`textual_inversion` and `hypernetwork` by their method only (`textual_inversion`'s token
keys also by pivotal tuning, the `pivotal` section, with lora or dreambooth). A new method adds its
section here (a dataclass with defaults and a `check`) and one field in
`PersonalizeConfig`; `checks.validate` calls every section's `check`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from personalize.errors import ConfigError, need


def _changed(section: Any) -> list[str]:
    """The keys of `section` that differ from its defaults."""
    defaults = type(section)()
    return [
        f.name
        for f in dataclasses.fields(section)
        if getattr(section, f.name) != getattr(defaults, f.name)
    ]


LORA_TYPES = ("lora", "loha", "lokr")


@dataclass
class LoRAConfig:
    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1.0)
    dropout: float = 0.0
    unet_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    text_encoder_lr: float | None = None  # None = train.lr
    # SDXL: train_text_encoder adapts both text encoders; the second (OpenCLIP-bigG) gets
    # this LR. None = text_encoder_lr.
    text_encoder_2_lr: float | None = None
    use_dora: bool = False
    # lora | loha | lokr (the LyCORIS kinds, through peft's LoHaConfig / LoKrConfig;
    # docs/lycoris.md). Conv layers ("LoCon") by naming them in unet_target_modules.
    type: str = "lora"
    # loha/lokr on 3x3 convs: the Tucker form (hada_t1/t2, lokr_t2; LyCORIS' use_tucker).
    use_effective_conv2d: bool = False
    # lokr: the Kronecker factor (-1 = near the square root of each dimension) and whether
    # the small factor w1 is low-rank too.
    decompose_factor: int = -1
    decompose_both: bool = False

    def check(self, cfg) -> None:
        need(self.rank > 0, "lora.rank", "must be > 0")
        need(
            self.type in LORA_TYPES,
            "lora.type",
            f"must be one of {', '.join(LORA_TYPES)}, got {self.type!r}",
        )
        if self.type != "lora":
            need(
                not self.use_dora,
                "lora.use_dora",
                f"DoRA is a lora.type: lora option; {self.type} has none (set use_dora: false)",
            )
            need(
                self.dropout == 0.0,
                "lora.dropout",
                f"is LoRA's input dropout; peft's {self.type} has none (set it to 0)",
            )
            need(
                cfg.regularization.weight_constraint is None,
                "regularization.weight_constraint",
                f"l2sp is implemented for lora.type: lora only, not {self.type}",
            )
        else:
            need(
                not self.use_effective_conv2d,
                "lora.use_effective_conv2d",
                "applies to lora.type loha or lokr only",
            )
        need(
            not (self.type == "lokr" and self.use_effective_conv2d),
            "lora.use_effective_conv2d",
            "is for loha only: ComfyUI fails on LoKr's Tucker form (lokr_t2) and leaves "
            "those layers unpatched",
        )
        if self.type != "lokr":
            need(
                self.decompose_factor == -1 and not self.decompose_both,
                "lora.decompose_factor" if self.decompose_factor != -1 else "lora.decompose_both",
                "applies to lora.type: lokr only",
            )
        need(
            self.decompose_factor == -1 or self.decompose_factor >= 2,
            "lora.decompose_factor",
            f"must be -1 (automatic) or >= 2, got {self.decompose_factor}",
        )
        for key in ("text_encoder_lr", "text_encoder_2_lr"):
            lr = getattr(self, key)
            need(
                lr is None or (lr > 0 and math.isfinite(lr)),
                f"lora.{key}",
                f"must be > 0 and finite, or null for train.lr; got {lr}",
            )
        need(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")


@dataclass
class TextualInversionConfig:
    # The new pseudo-word; a multi-vector token is written once in prompts and expands to
    # <token> <token>_1 ... <token>_{n-1} (diffusers' naming).
    placeholder_token: str = "<concept>"
    # A word close to the concept whose embedding starts the new rows: one token (copied to
    # every vector) or exactly num_vectors tokens (one each). null = the mean embedding.
    initializer_token: str | None = None
    num_vectors: int = 1
    learnable_property: str = "object"  # object | style (built-in templates) | caption
    # Your own templates instead of the built-in ones; each holds {} for the placeholder.
    templates: list[str] | None = None
    save_every: int = 0  # intermediate learned_embeds-steps-N.safetensors

    def check(self, cfg) -> None:
        need(self.num_vectors >= 1, "textual_inversion.num_vectors", "must be >= 1")
        need(
            self.learnable_property in ("object", "style", "caption"),
            "textual_inversion.learnable_property",
            "must be object, style or caption",
        )
        for i, template in enumerate(self.templates or []):
            need(
                "{}" in template,
                f"textual_inversion.templates[{i}]",
                f"{template!r} has no {{}} where the placeholder goes, e.g. 'a photo of a {{}}'",
            )
        need(
            self.save_every >= 0,
            "textual_inversion.save_every",
            "must be >= 0 (0 = only the final file)",
        )


_PIVOTAL_METHODS = ("lora", "dreambooth")
# textual_inversion keys that pivotal tuning does not read: it trains on the data's captions.
_PIVOTAL_UNREAD = ("learnable_property", "templates", "save_every")


@dataclass
class PivotalConfig:
    # Pivotal tuning (docs/lora.md): a new token's embedding (Textual Inversion) trained
    # jointly with method lora or dreambooth. The token is textual_inversion.placeholder_token
    # (with its initializer_token and num_vectors); data.prompt and captions must contain it.
    enabled: bool = False
    learning_rate: float | None = None  # the embedding's LR; None = train.lr
    # Stop training the embedding after a fraction of train.max_steps (a number below 1) or
    # after this many steps (a whole number >= 1); its rows then stay exactly as they are.
    # None = it trains for the whole run.
    stop_after: float | None = None

    def stop_step(self, max_steps: int) -> int | None:
        """The optimizer step after which the embedding stops training, or None."""
        if self.stop_after is None:
            return None
        if self.stop_after < 1:
            return max(1, round(self.stop_after * max_steps))
        return int(self.stop_after)

    def check(self, cfg) -> None:
        if not self.enabled:
            for key in _changed(self):
                raise ConfigError(f"pivotal.{key} is read only with pivotal.enabled: true")
            return
        need(
            cfg.method in _PIVOTAL_METHODS,
            "pivotal.enabled",
            f"trains a token beside method lora or dreambooth, not {cfg.method} "
            "(method textual_inversion trains the token alone)",
        )
        need(
            self.learning_rate is None
            or (self.learning_rate > 0 and math.isfinite(self.learning_rate)),
            "pivotal.learning_rate",
            f"must be > 0 and finite, or null for train.lr; got {self.learning_rate}",
        )
        stop = self.stop_after
        need(
            stop is None or (stop > 0 and (stop < 1 or float(stop).is_integer())),
            "pivotal.stop_after",
            f"must be a fraction of train.max_steps below 1 (e.g. 0.5) or a whole number of "
            f"steps, or null to train the embedding all run; got {stop}",
        )
        need(
            not (cfg.method == "dreambooth" and cfg.dreambooth.train_text_encoder),
            "pivotal.enabled",
            "dreambooth.train_text_encoder trains the whole text encoder, the embedding table "
            "included; use one or the other",
        )
        for key in _PIVOTAL_UNREAD:
            if key in _changed(cfg.textual_inversion):
                raise ConfigError(
                    f"textual_inversion.{key} is not read by pivotal tuning: it trains on "
                    "data.prompt and the captions, which must contain the placeholder token"
                )


@dataclass
class PriorConfig:
    # Prior preservation (the DreamBooth paper's class-specific prior), read by method
    # dreambooth and method lora; docs/dreambooth.md explains each option and its cost.
    enabled: bool = False
    # How the prior is kept: class_images (generated/provided images of the class, loss
    # instance + loss_weight * class) | distillation (no images: match the frozen original
    # model's noise prediction on class_prompt, weighted by distillation_weight).
    kind: str = "class_images"
    class_prompt: str | None = None  # e.g. "a photo of a dog" (the instance prompt minus "sks")
    class_data_dir: str | None = None  # None = output_dir/class_images
    num_class_images: int = 100  # missing ones are generated before training
    loss_weight: float = 1.0
    distillation_weight: float = 1.0
    # Generating the missing class images with the base model: batch, denoising steps,
    # guidance, and the autocast dtype on a GPU (fp16 | bf16 | no; None = the training's
    # mixed_precision; ignored on CPU).
    generation_batch_size: int = 4
    generation_steps: int = 50
    generation_guidance_scale: float = 7.5
    generation_precision: str | None = None

    def check(self, cfg) -> None:
        if cfg.data.reg_path:
            need(
                self.enabled and self.kind == "class_images",
                "data.reg_path",
                "holds regularization (class) images for prior preservation: set "
                "prior.enabled: true (its loss_weight is kohya's prior_loss_weight)",
            )
        need(
            self.kind in ("class_images", "distillation"),
            "prior.kind",
            f"must be class_images or distillation, got {self.kind!r}",
        )
        need(self.num_class_images >= 1, "prior.num_class_images", "must be >= 1")
        need(self.loss_weight >= 0, "prior.loss_weight", "must be >= 0")
        need(self.distillation_weight >= 0, "prior.distillation_weight", "must be >= 0")
        need(self.generation_batch_size >= 1, "prior.generation_batch_size", "must be >= 1")
        need(self.generation_steps >= 1, "prior.generation_steps", "must be >= 1")
        need(
            self.generation_precision in (None, "no", "fp16", "bf16"),
            "prior.generation_precision",
            f"must be no, fp16, bf16 or null, got {self.generation_precision!r}",
        )
        if self.kind == "distillation":
            need(
                self.enabled,
                "prior.kind",
                "distillation is a kind of prior preservation: set prior.enabled: true as "
                "well (or remove prior.kind)",
            )
        # Class prompts may come per concept instead (data.concepts[].class_prompt, or the
        # folder names under data.reg_path); a concept without one trains unpaired.
        per_concept = bool(cfg.data.reg_path) or any(c.class_prompt for c in cfg.data.concepts)
        if self.enabled and not (per_concept and self.kind == "class_images"):
            need(
                bool(self.class_prompt),
                "prior.class_prompt",
                "prior preservation needs the class prompt, e.g. 'a photo of a dog' "
                "(the instance prompt without the identifier)",
            )


@dataclass
class RegularizationConfig:
    # L2-SP, read by method dreambooth and method lora:
    # weight_constraint_lambda * sum (theta - theta*)^2 toward the pretrained weights.
    weight_constraint: str | None = None  # None | l2sp
    weight_constraint_lambda: float = 0.0
    # Where theta* lives: auto (GPU: fp16 on the GPU, CPU: fp32) | device (fp32 on the
    # training device, exact) | cpu (fp32 in host memory, streamed every step).
    weight_constraint_anchor: str = "auto"

    def check(self, cfg) -> None:
        need(
            self.weight_constraint in (None, "l2sp"),
            "regularization.weight_constraint",
            f"must be l2sp or null, got {self.weight_constraint!r}",
        )
        need(
            self.weight_constraint_lambda >= 0,
            "regularization.weight_constraint_lambda",
            "must be >= 0",
        )
        need(
            self.weight_constraint_anchor in ("auto", "device", "cpu"),
            "regularization.weight_constraint_anchor",
            f"must be auto, device or cpu, got {self.weight_constraint_anchor!r}",
        )


# What LoRA users set instead of a dreambooth option, for the error message.
_LORA_COUNTERPART = {
    "train_text_encoder": "lora.train_text_encoder",
    "text_encoder_lr": "lora.text_encoder_lr",
    "text_encoder_2_lr": "lora.text_encoder_2_lr",
    "train_unet_blocks": "lora.unet_target_modules",
}


@dataclass
class DreamBoothConfig:
    # Read by method dreambooth only (full fine-tuning); docs/dreambooth.md.
    # Fine-tune the text encoder too (LoRA has lora.train_text_encoder).
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None = train.lr
    # SDXL: train_text_encoder fine-tunes both text encoders; the second (OpenCLIP-bigG)
    # gets this LR. None = text_encoder_lr.
    text_encoder_2_lr: float | None = None
    stop_text_encoder_training: int | None = None  # freeze it after this many steps
    # Train only these UNet blocks (dotted prefixes, e.g. [up_blocks, mid_block]); None = all.
    train_unet_blocks: list[str] | None = None
    # Also write <output_dir>/<name>.safetensors in the original SD layout (webui/ComfyUI).
    save_single_file: bool = False
    save_precision: str = "fp32"  # fp32 | fp16 | bf16, for the saved pipeline and file

    def check(self, cfg) -> None:
        need(
            self.save_precision in ("fp32", "fp16", "bf16"),
            "dreambooth.save_precision",
            f"must be fp32, fp16 or bf16, got {self.save_precision!r}",
        )
        for key in ("text_encoder_lr", "text_encoder_2_lr"):
            lr = getattr(self, key)
            need(lr is None or lr > 0, f"dreambooth.{key}", "must be > 0")
        need(
            self.stop_text_encoder_training is None or self.stop_text_encoder_training > 0,
            "dreambooth.stop_text_encoder_training",
            "must be > 0 (to never train the text encoder set "
            "dreambooth.train_text_encoder: false)",
        )
        need(
            self.train_unet_blocks is None or len(self.train_unet_blocks) > 0,
            "dreambooth.train_unet_blocks",
            "must list at least one block (or be null to train the whole UNet)",
        )
        if cfg.method == "lora":
            for key in _changed(self):
                instead = _LORA_COUNTERPART.get(key)
                hint = f"; for LoRA use {instead}" if instead else ""
                raise ConfigError(f"dreambooth.{key} is read by method dreambooth only{hint}")


@dataclass
class HypernetworkConfig:
    # Width multipliers of each MLP; starts and ends with 1 (webui default [1, 2, 1]).
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    # linear | relu | leakyrelu | elu | swish (= Hardswish) | tanh | sigmoid | any torch.nn
    # activation by lower-cased class name (gelu, silu, mish, ...).
    activation: str = "linear"
    layer_norm: bool = False
    use_dropout: bool = False
    # One probability per layer_structure entry; None = the webui's rule (0.3 on hidden
    # layers, the last one only with last_layer_dropout). Needs use_dropout.
    dropout_structure: list[float] | None = None
    last_layer_dropout: bool = False
    weight_init: str = "Normal"  # Normal | XavierUniform | XavierNormal | KaimingUniform | ...
    activate_output: bool = False
    # Context widths that get a (k, v) pair: SD1 text 768 + self-attention 320/640/1280.
    enable_sizes: list[int] = field(default_factory=lambda: [768, 320, 640, 1280])
    name: str | None = None  # file name and webui display name; None = output_dir's name

    def check(self, cfg) -> None:
        from personalize.hypernetwork_options import HypernetworkOptions

        if self.dropout_structure is not None and any(self.dropout_structure):
            need(
                self.use_dropout,
                "hypernetwork.dropout_structure",
                "has non-zero entries but hypernetwork.use_dropout is false; set "
                "hypernetwork.use_dropout: true (or drop dropout_structure)",
            )
        need(
            bool(self.enable_sizes) and all(w > 0 for w in self.enable_sizes),
            "hypernetwork.enable_sizes",
            f"must list positive widths, got {self.enable_sizes}",
        )
        options = HypernetworkOptions(
            layer_structure=self.layer_structure,
            activation_func=self.activation,
            weight_initialization=self.weight_init,
            use_dropout=self.use_dropout,
            last_layer_dropout=self.last_layer_dropout,
            dropout_structure=self.dropout_structure if self.use_dropout else None,
        )
        names = {"activation_func": "activation", "weight_initialization": "weight_init"}
        for problem in options.problems():
            key, msg = problem.split(": ", 1)
            raise ConfigError(f"hypernetwork.{names.get(key, key)}: {msg}")
