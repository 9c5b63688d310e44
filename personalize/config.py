"""Typed configuration: dataclasses, YAML loading, dotted overrides, validation.

One `PersonalizeConfig` describes a run. Sections are plain dataclasses so a config
reads like the YAML it came from; `from_dict` checks every key and type and names the
dotted key at fault, because a typo that silently falls back to a default costs a user
a whole training run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from personalize.errors import ConfigError


@dataclass
class ModelConfig:
    # A local diffusers folder (model_index.json), a single-file .safetensors/.ckpt
    # checkpoint, or a hub id (only when the machine is online).
    path: str = ""
    revision: str | None = None
    variant: str | None = None
    # Override the scheduler's prediction type ("epsilon" | "v_prediction"); None keeps it.
    prediction_type: str | None = None


@dataclass
class DataConfig:
    # A folder of images (+ optional .txt captions), a metadata.jsonl/.csv, or a saved
    # `datasets` dataset.
    path: str = ""
    # The instance prompt, used for every image that has no caption.
    prompt: str | None = None
    caption_extension: str = ".txt"
    image_column: str = "image"
    caption_column: str = "text"
    repeats: int = 1
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    center_crop: bool = True
    random_flip: bool = False
    # strict: a corrupt image stops the run instead of being skipped with a warning.
    strict: bool = False
    # Held-out images for the validation loss: a fraction of data.path, or a folder.
    validation_split: float = 0.0
    validation_path: str | None = None
    num_workers: int = 0
    pin_memory: bool = True  # page-locked batches, copied to the GPU without a sync (CUDA only)
    # Encode each image view once with the VAE, on first use, and reuse it (each flip too);
    # not with random crops (center_crop=false), where every epoch crops differently.
    cache_latents: bool = True
    # Encode each caption once when the method leaves the text encoder frozen and the
    # captions are a fixed set (no shuffle_tags, no per-step caption templates).
    cache_text_embeddings: bool = True
    # Where cache entries live (keyed by content hash, so a shared folder is safe across
    # runs); None = output_dir/cache.
    cache_dir: str | None = None
    # Aspect-ratio bucketing: each image trains at the bucket (w, h), sides multiples of
    # bucket_step in [bucket_min_size, bucket_max_size], with about resolution**2 pixels.
    bucketing: bool = False
    bucket_min_size: int = 256
    bucket_max_size: int = 1024
    bucket_step: int = 64


@dataclass
class TrainConfig:
    max_steps: int = 500
    resolution: int = 512
    batch_size: int = 1
    lr: float = 1e-4
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    lr_scheduler: str = "constant"  # any diffusers.optimization scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt) | adamw_schedulefree
    # (schedulefree) | adafactor; the extra packages are optional (docs/loop.md).
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # Min-SNR loss weighting (Hang et al. 2023); 5.0 is the paper's value. None = off.
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    # Save a resumable checkpoint every N optimizer steps (0 = only at the end).
    checkpoint_every: int = 0
    checkpoints_total_limit: int = 3
    # Stop when the validation loss has not improved for this many evaluations (0 = off).
    early_stopping_patience: int = 0
    # Stop after this many consecutive non-finite losses.
    max_nonfinite_steps: int = 5
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    # Fast paths (docs/benchmarks.md measures each). attention: sdpa (PyTorch's fused
    # scaled-dot-product attention) | xformers (needs the xformers package, CUDA only).
    attention: str = "sdpa"
    allow_tf32: bool = True  # TF32 matmuls/convolutions on Ampere+ GPUs
    channels_last: bool = False  # NHWC memory format for the UNet's convolutions
    compile_unet: bool = False  # torch.compile the UNet (first steps are slow: compiling)
    # Fused AdamW (one kernel for all parameters; also lets the NaN guard skip a step on the
    # device, without a host sync); falls back to foreach where unsupported.
    fused_optimizer: bool = True


@dataclass
class ValidationConfig:
    # Sample images with these prompts every `every_steps` steps (0 = off).
    prompts: list[str] = field(default_factory=list)
    every_steps: int = 0
    num_images: int = 2
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    # Denoising loss on held-out images at fixed timesteps and noise, every N steps (0 = off).
    loss_every_steps: int = 0
    loss_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])


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
    use_dora: bool = False


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


@dataclass
class DreamBoothConfig:
    # Settings shared by `method: dreambooth` and `method: lora` (DreamBooth-LoRA);
    # docs/dreambooth.md explains each one and what it costs in memory.
    # Prior preservation (the paper's class-specific prior): train on class examples too.
    with_prior_preservation: bool = False
    # How the prior is kept: class_images (generated/provided images of the class, loss
    # instance + prior_loss_weight * class) | distillation (no images: match the frozen
    # original model's noise prediction on class_prompt).
    prior: str = "class_images"
    class_prompt: str | None = None  # e.g. "a photo of a dog" (the instance prompt minus "sks")
    class_data_dir: str | None = None  # None = output_dir/class_images
    num_class_images: int = 100  # missing ones are generated before training
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4  # class-image generation batch
    class_num_inference_steps: int = 50
    class_guidance_scale: float = 7.5
    # Autocast dtype for class-image generation on a GPU: fp16 | bf16 | no; None = the
    # training's mixed_precision. Ignored on CPU.
    class_precision: str | None = None
    distillation_weight: float = 1.0
    # Fine-tune the text encoder too (dreambooth only; LoRA has lora.train_text_encoder).
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None  # None = train.lr
    stop_text_encoder_training: int | None = None  # freeze it after this many steps
    # Train only these UNet blocks (dotted prefixes, e.g. [up_blocks, mid_block]); None = all.
    train_unet_blocks: list[str] | None = None
    # L2-SP: lambda * sum (theta - theta*)^2 toward the pretrained weights.
    weight_constraint: str | None = None  # None | l2sp
    weight_constraint_lambda: float = 0.0
    # Where theta* lives: auto (GPU: fp16 on the GPU, CPU: fp32) | device (fp32 on the
    # training device, exact) | cpu (fp32 in host memory, streamed every step).
    weight_constraint_anchor: str = "auto"
    # Also write <output_dir>/<name>.safetensors in the original SD layout (webui/ComfyUI).
    save_single_file: bool = False
    save_precision: str = "fp32"  # fp32 | fp16 | bf16, for the saved pipeline and file


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


@dataclass
class PersonalizeConfig:
    method: str = "lora"  # lora | textual_inversion | dreambooth | hypernetwork
    output_dir: str = "outputs/run"
    seed: int = 42
    # A checkpoint folder, or "latest" (the newest complete one in output_dir/checkpoints).
    resume: str | None = None
    # Allow writing into an output_dir that already holds another run.
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ti: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    db: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    hn: HypernetworkConfig = field(default_factory=HypernetworkConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


METHODS = ("lora", "textual_inversion", "dreambooth", "hypernetwork")


# --------------------------------------------------------------------------- parsing

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of options, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML reads `1e-4` (no dot) as a string (YAML 1.1); accept what is clearly a number.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key(s): {', '.join(where + k for k in unknown)}. "
            f"Valid keys{' under ' + prefix if prefix else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if key in _PRECISION_KEYS and value is not None:
            value = _precision(value, key)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


# Keys that hold a precision name, and how each spells full precision.
_PRECISION_KEYS = {
    "train.mixed_precision": "no",
    "db.class_precision": "no",
    "db.save_precision": "fp32",
}


def _precision(value: Any, key: str) -> str:
    """no / fp32 / false / off (YAML reads an unquoted `no` as false) all mean full precision."""
    from personalize.precision import canonical_precision

    try:
        name = canonical_precision(value)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return _PRECISION_KEYS[key] if name == "no" else name


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "data.path=imgs"]` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(data: dict[str, Any]) -> PersonalizeConfig:
    cfg = _build(PersonalizeConfig, data)
    validate(cfg)
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.start} cannot be decoded); re-save it as UTF-8"
        ) from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of options at the top level")
    return loaded


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> PersonalizeConfig:
    """Load YAML (optional), apply `base` defaults underneath and dotted overrides on top."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, read_yaml_mapping(path))
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(data)


def validate(cfg: PersonalizeConfig) -> None:
    """Range checks that types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(
        cfg.method in METHODS, "method", f"must be one of {', '.join(METHODS)}, got {cfg.method!r}"
    )
    # numpy's legacy seeding (accelerate's set_seed) takes 0 .. 2**32 - 1.
    need(0 <= cfg.seed < 2**32, "seed", f"must be an integer in [0, 2**32), got {cfg.seed}")
    t = cfg.train
    need(t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    need(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0 and finite, got {t.lr}")
    need(
        t.lr_warmup_steps >= 0,
        "train.lr_warmup_steps",
        f"must be >= 0 (0 = no warm-up), got {t.lr_warmup_steps}",
    )
    need(
        t.early_stopping_patience >= 0,
        "train.early_stopping_patience",
        f"must be >= 0 (0 = off), got {t.early_stopping_patience}",
    )
    need(t.batch_size > 0, "train.batch_size", f"must be > 0, got {t.batch_size}")
    need(
        t.resolution >= 8 and t.resolution % 8 == 0,
        "train.resolution",
        f"must be a positive multiple of 8, got {t.resolution}",
    )
    need(t.gradient_accumulation_steps > 0, "train.gradient_accumulation_steps", "must be > 0")
    need(
        t.mixed_precision in ("no", "fp16", "bf16"),
        "train.mixed_precision",
        f"must be no (or fp32), fp16 or bf16, got {t.mixed_precision!r}",
    )
    need(
        t.optimizer in ("adamw", "adamw8bit", "prodigy", "adamw_schedulefree", "adafactor"),
        "train.optimizer",
        "must be adamw, adamw8bit (bitsandbytes), prodigy (prodigyopt), adamw_schedulefree "
        f"(schedulefree) or adafactor, got {t.optimizer!r}",
    )
    need(
        t.optimizer != "adamw8bit" or importlib.util.find_spec("bitsandbytes") is not None,
        "train.optimizer",
        "adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
        "(or train.optimizer=adamw)",
    )
    _validate_lr_scheduler(t.lr_scheduler)
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 = no clipping)")
    need(t.snr_gamma is None or t.snr_gamma > 0, "train.snr_gamma", "must be > 0 or null")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(t.checkpoints_total_limit >= 1, "train.checkpoints_total_limit", "must be >= 1")
    need(
        t.report_to in ("tensorboard", "wandb", "none"),
        "train.report_to",
        f"must be tensorboard, wandb or none, got {t.report_to!r}",
    )
    need(
        t.attention in ("sdpa", "xformers"),
        "train.attention",
        f"must be sdpa or xformers, got {t.attention!r}",
    )
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    d = cfg.data
    need(0.0 <= d.validation_split < 1.0, "data.validation_split", "must be in [0, 1)")
    need(0.0 <= d.caption_dropout <= 1.0, "data.caption_dropout", "must be in [0, 1]")
    need(d.repeats >= 1, "data.repeats", "must be >= 1")
    need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    if d.bucketing:
        need(
            d.bucket_step > 0 and d.bucket_step % 8 == 0,
            "data.bucket_step",
            f"must be a positive multiple of 8, got {d.bucket_step}",
        )
        need(
            d.bucket_min_size <= t.resolution <= d.bucket_max_size,
            "data.bucket_min_size",
            f"data.bucket_min_size ({d.bucket_min_size}) <= train.resolution "
            f"({t.resolution}) <= data.bucket_max_size ({d.bucket_max_size}) must hold",
        )
    m = cfg.model
    need(
        m.prediction_type in (None, "epsilon", "v_prediction"),
        "model.prediction_type",
        "must be epsilon, v_prediction or null",
    )
    v = cfg.validation
    need(
        all(0 <= ts < 1000 for ts in v.loss_timesteps),
        "validation.loss_timesteps",
        "must be timesteps in [0, 1000)",
    )
    for key in ("every_steps", "loss_every_steps"):
        need(
            getattr(v, key) >= 0,
            f"validation.{key}",
            f"must be >= 0 (0 = off), got {getattr(v, key)}",
        )
    _validate_held_out(cfg)
    need(cfg.lora.rank > 0, "lora.rank", "must be > 0")
    need(
        cfg.lora.text_encoder_lr is None
        or (cfg.lora.text_encoder_lr > 0 and math.isfinite(cfg.lora.text_encoder_lr)),
        "lora.text_encoder_lr",
        f"must be > 0 and finite, or null for train.lr; got {cfg.lora.text_encoder_lr}",
    )
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(cfg.ti.num_vectors >= 1, "ti.num_vectors", "must be >= 1")
    need(
        cfg.ti.learnable_property in ("object", "style", "caption"),
        "ti.learnable_property",
        "must be object, style or caption",
    )
    for i, template in enumerate(cfg.ti.templates or []):
        need(
            "{}" in template,
            f"ti.templates[{i}]",
            f"{template!r} has no {{}} where the placeholder goes, e.g. 'a photo of a {{}}'",
        )
    need(cfg.ti.save_every >= 0, "ti.save_every", "must be >= 0 (0 = only the final file)")
    _validate_dreambooth(cfg)
    _validate_hypernetwork(cfg.hn)


def _validate_lr_scheduler(name: str) -> None:
    from diffusers.optimization import SchedulerType

    valid = [s.value for s in SchedulerType]
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ConfigError(
            f"train.lr_scheduler: unknown scheduler {name!r}{hint} Valid: {', '.join(valid)}"
        )


def _validate_held_out(cfg: PersonalizeConfig) -> None:
    """Held-out images, the validation loss and early stopping only work together; any one
    without the others used to be ignored without a word (or cost training images)."""
    d, v, patience = cfg.data, cfg.validation, cfg.train.early_stopping_patience
    if d.validation_path:
        held_out = f"data.validation_path={d.validation_path}"
    elif d.validation_split > 0:
        held_out = f"data.validation_split={d.validation_split:g}"
    else:
        held_out = None
    if patience and not (held_out and v.loss_every_steps):
        raise ConfigError(
            f"train.early_stopping_patience={patience} needs the validation loss: set "
            "validation.loss_every_steps (e.g. 50) and data.validation_split (e.g. 0.2) or "
            "data.validation_path; or train.early_stopping_patience=0"
        )
    if held_out and not v.loss_every_steps:
        raise ConfigError(
            f"{held_out} holds out images for the validation loss, but "
            "validation.loss_every_steps is 0 (off), so they would only be missing from "
            f"training; set validation.loss_every_steps (e.g. 50), or {held_out.split('=')[0]}"
            f"={'null' if d.validation_path else '0'}"
        )
    if v.loss_every_steps and not held_out:
        raise ConfigError(
            f"validation.loss_every_steps={v.loss_every_steps} needs held-out images: set "
            "data.validation_split (e.g. 0.2) or data.validation_path; or "
            "validation.loss_every_steps=0"
        )


def _validate_hypernetwork(hn: HypernetworkConfig) -> None:
    from personalize.hypernetwork_options import HypernetworkOptions

    if hn.dropout_structure is not None and any(hn.dropout_structure) and not hn.use_dropout:
        raise ConfigError(
            "hn.dropout_structure has non-zero entries but hn.use_dropout is "
            "false; set hn.use_dropout: true (or drop dropout_structure)"
        )
    if not hn.enable_sizes or any(w <= 0 for w in hn.enable_sizes):
        raise ConfigError(f"hn.enable_sizes: must list positive widths, got {hn.enable_sizes}")
    options = HypernetworkOptions(
        layer_structure=hn.layer_structure,
        activation_func=hn.activation,
        weight_initialization=hn.weight_init,
        use_dropout=hn.use_dropout,
        last_layer_dropout=hn.last_layer_dropout,
        dropout_structure=hn.dropout_structure if hn.use_dropout else None,
    )
    names = {"activation_func": "activation", "weight_initialization": "weight_init"}
    for problem in options.problems():
        key, msg = problem.split(": ", 1)
        raise ConfigError(f"hn.{names.get(key, key)}: {msg}")


# Options of the db section that only `method: dreambooth` reads; LoRA has its own.
_DREAMBOOTH_ONLY = {
    "train_text_encoder": "lora.train_text_encoder",
    "text_encoder_lr": "lora.text_encoder_lr",
    "stop_text_encoder_training": None,
    "train_unet_blocks": "lora.unet_target_modules",
    "save_single_file": None,
    "save_precision": None,
}


def _validate_dreambooth(cfg: PersonalizeConfig) -> None:
    db = cfg.db

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"db.{key}: {msg}")

    need(
        db.prior in ("class_images", "distillation"),
        "prior",
        f"must be class_images or distillation, got {db.prior!r}",
    )
    need(
        db.weight_constraint in (None, "l2sp"),
        "weight_constraint",
        f"must be l2sp or null, got {db.weight_constraint!r}",
    )
    need(db.weight_constraint_lambda >= 0, "weight_constraint_lambda", "must be >= 0")
    need(
        db.weight_constraint_anchor in ("auto", "device", "cpu"),
        "weight_constraint_anchor",
        f"must be auto, device or cpu, got {db.weight_constraint_anchor!r}",
    )
    need(db.num_class_images >= 1, "num_class_images", "must be >= 1")
    need(db.prior_loss_weight >= 0, "prior_loss_weight", "must be >= 0")
    need(db.distillation_weight >= 0, "distillation_weight", "must be >= 0")
    need(db.sample_batch_size >= 1, "sample_batch_size", "must be >= 1")
    need(db.class_num_inference_steps >= 1, "class_num_inference_steps", "must be >= 1")
    need(
        db.class_precision in (None, "no", "fp16", "bf16"),
        "class_precision",
        f"must be no, fp16, bf16 or null, got {db.class_precision!r}",
    )
    need(
        db.save_precision in ("fp32", "fp16", "bf16"),
        "save_precision",
        f"must be fp32, fp16 or bf16, got {db.save_precision!r}",
    )
    need(db.text_encoder_lr is None or db.text_encoder_lr > 0, "text_encoder_lr", "must be > 0")
    need(
        db.stop_text_encoder_training is None or db.stop_text_encoder_training > 0,
        "stop_text_encoder_training",
        "must be > 0 (to never train the text encoder set db.train_text_encoder: false)",
    )
    need(
        db.train_unet_blocks is None or len(db.train_unet_blocks) > 0,
        "train_unet_blocks",
        "must list at least one block (or be null to train the whole UNet)",
    )
    if db.prior == "distillation":
        need(
            db.with_prior_preservation,
            "prior",
            "distillation is a kind of prior preservation: set db.with_prior_preservation: "
            "true as well (or remove db.prior)",
        )
    if db.with_prior_preservation:
        need(
            bool(db.class_prompt),
            "class_prompt",
            "prior preservation needs the class prompt, e.g. 'a photo of a dog' "
            "(the instance prompt without the identifier)",
        )
    if cfg.method == "lora":
        defaults = DreamBoothConfig()
        for key, instead in _DREAMBOOTH_ONLY.items():
            if getattr(db, key) != getattr(defaults, key):
                hint = f"; for LoRA use {instead}" if instead else ""
                raise ConfigError(f"db.{key} is read by method dreambooth only{hint}")


# Public names for the modules that build configs of their own (evaluation, the benchmark).
merge_dicts = _merge
build_dataclass = _build
