"""The general config sections: the model, the data, the training loop, validation.

Sections are plain dataclasses so a config reads like the YAML it came from; the method
sections (what one method or one training concept reads) live in `method_sections.py`,
and `PersonalizeConfig` (below) holds one of each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from personalize.config.method_sections import (
    DreamBoothConfig,
    HypernetworkConfig,
    LoRAConfig,
    PivotalConfig,
    PriorConfig,
    RegularizationConfig,
    TextualInversionConfig,
)


@dataclass
class ModelConfig:
    # A local diffusers folder (model_index.json), a single-file .safetensors/.ckpt
    # checkpoint, or a hub id (only when the machine is online).
    path: str = ""
    revision: str | None = None
    variant: str | None = None
    # Override the scheduler's prediction type ("epsilon" | "v_prediction"); None keeps it.
    prediction_type: str | None = None
    # A separate VAE (a diffusers VAE folder or a single .safetensors file) replacing the
    # model's own, e.g. an fp16-fixed SDXL VAE; None keeps the model's.
    vae_path: str | None = None


@dataclass
class ConceptConfig:
    # One concept of a multi-concept run (data.concepts, docs/data.md): its own images,
    # instance prompt, repeats, caption settings and class images. An unset (null) caption
    # or class setting takes the data section's (prior section's) value.
    path: str = ""  # any layout data.path accepts
    prompt: str | None = None  # the instance prompt for its images without a caption
    name: str | None = None  # how logs, errors and folders name it; None = the folder's name
    repeats: int = 1
    caption_extension: str | None = None
    caption_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tokens: int | None = None
    # Prior preservation: this concept's class prompt and class images (None = prior.*).
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int | None = None


@dataclass
class DataConfig:
    # A folder of images (+ optional .txt captions), a metadata.jsonl/.csv, or a saved
    # `datasets` dataset; or a kohya-style folder of `<repeats>_<prompt>` subfolders, each
    # read as one concept.
    path: str = ""
    # Several concepts in one run instead of data.path (docs/data.md, "Several concepts").
    concepts: list[ConceptConfig] = field(default_factory=list)
    # repeats: each concept shows its images x its repeats per epoch (kohya) | equal: every
    # concept shows as many examples per epoch as the largest one, whatever its size.
    concept_balance: str = "repeats"
    # kohya's reg_data_dir: `<repeats>_<prompt>` subfolders of your own regularization
    # (class) images, used for prior preservation instead of generated ones.
    reg_path: str | None = None
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
    # Masked loss: weigh the denoising loss by a mask per image (white = learn, black =
    # ignore), from its alpha channel or a same-name mask file (docs/data.md).
    masked_loss: bool = False
    mask_source: str = "auto"  # alpha | file | auto (a mask file if there is one, else alpha)
    mask_dir: str | None = None  # a folder of masks named like the images (kohya, SimpleTuner)
    unmasked_weight: float = 0.0  # the least weight a pixel gets (1.0 = the mask is ignored)
    # Divide by the mean weight: a small subject's loss is the mean over the subject, not
    # tiny (OneTrainer's normalize_masked_area_loss).
    normalize_masked_loss: bool = True


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
    # An exponential moving average of the trained weights, validated and saved instead of
    # the raw ones (docs/loop.md, "EMA"): e.g. 0.99 for a few hundred steps, 0.999 for
    # thousands. null (or 0) = off. ema_warmup: diffusers' use_ema_warmup, the decay grows as
    # 1 - (1 + step) ** -ema_power (else as (1 + step) / (10 + step)), capped at ema_decay.
    ema_decay: float | None = None
    ema_warmup: bool = False
    ema_power: float = 2 / 3


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
class PersonalizeConfig:
    method: str = "lora"  # a module of personalize/methods: lora | textual_inversion | ...
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
    # Training concepts more than one method reads.
    prior: PriorConfig = field(default_factory=PriorConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    # Pivotal tuning: textual_inversion's token trained beside lora or dreambooth.
    pivotal: PivotalConfig = field(default_factory=PivotalConfig)
    # One section per method, read by that method only.
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    hypernetwork: HypernetworkConfig = field(default_factory=HypernetworkConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
