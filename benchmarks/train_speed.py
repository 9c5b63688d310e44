"""Training speed: our trainer against a reference script, same model, data and settings.

    python benchmarks/train_speed.py --method lora \\
        --reference /path/to/diffusers/examples/dreambooth/train_dreambooth_lora.py
    python benchmarks/train_speed.py --method textual_inversion \\
        --reference /path/to/diffusers/examples/textual_inversion/textual_inversion.py
    # GPU, SD1.5 architecture (random weights built in code, no download), 512 px:
    python benchmarks/train_speed.py --method lora --model sd15 --resolution 512 \\
        --batch-size 4 --mixed-precision bf16 --reference .../train_dreambooth_lora.py
    # SDXL (tiny-sdxl, or sdxl: SDXL base's architecture, random weights), memory options:
    python benchmarks/train_speed.py --method lora --model sdxl --resolution 1024 \\
        --batch-size 1 --mixed-precision bf16 --gradient-checkpointing --cache all \\
        --use-8bit-adam --reference .../train_dreambooth_lora_sdxl.py

The reference scripts are not part of this repository: fetch diffusers' examples yourself.
They import torchvision, so run this from an environment that has it (docs/benchmarks.md).

Each repetition launches both trainers as fresh processes (alternating which goes first,
so neither always meets a warmer page cache), through `step_timer.py`, which stamps every
optimizer step the same way for both. Reported per trainer, as medians over repetitions:
steady it/s (steps after `--warmup`), seconds from launch to the end of the first step,
peak memory (RSS on CPU, max_memory_allocated on CUDA), and ours/reference ratios. With a
GPU also model FLOPs utilization: measured UNet forward+backward FLOPs of one step x it/s
/ the device's peak bf16 FLOP/s. `--variant NAME:key=value,...` adds runs of our trainer
with other settings (e.g. one fast path switched off), to measure each fast path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sdxl_model, beside this file
PROMPT = "a photo of sks disc"
PLACEHOLDER, INITIALIZER = "<concept>", "o"  # one byte-level token in the tiny tokenizer
# Dense bf16 peak FLOP/s (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}
LRS = {"lora": 1e-4, "dreambooth": 5e-6, "textual_inversion": 5e-4}
SDXL_MODELS = ("tiny-sdxl", "sdxl")
# What `--cache` caches in our trainer: (latents, text embeddings). Each cache also moves
# its encoder off the GPU. "default" leaves our config's defaults (both on).
CACHES = {
    "none": (False, False),
    "text": (False, True),
    "latents": (True, False),
    "all": (True, True),
}


# --------------------------------------------------------------------------- setup


def build_sd15(path: Path) -> Path:
    """A pipeline with the SD1.5 UNet/VAE/text-encoder architecture and random weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.testing import tiny_scheduler, tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()  # byte-level: only the vocabulary size differs from SD's
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    n = len(tokenizer)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
            projection_dim=768,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_model(model: str, path: Path) -> Path:
    from personalize.testing import save_tiny_pipeline, save_tiny_sdxl_pipeline

    if model == "sdxl":
        from sdxl_model import build_sdxl

        return build_sdxl(path)
    builders = {
        "tiny": save_tiny_pipeline,
        "sd15": build_sd15,
        "tiny-sdxl": save_tiny_sdxl_pipeline,
    }
    return builders[model](path)


def prepare(work: Path, model: str, resolution: int, num_images: int) -> tuple[Path, Path]:
    from personalize.testing import write_synthetic_images

    model_dir = work / f"model-{model}"
    if not (model_dir / "model_index.json").is_file():
        build_model(model, model_dir)
    data_dir = work / f"data-{resolution}-{num_images}"
    if not data_dir.is_dir():
        # Exactly `resolution` square: the reference's resize/crop (random unless
        # --center_crop) is then the identity, as ours is.
        write_synthetic_images(data_dir, count=num_images, size=resolution)
    return model_dir, data_dir


# --------------------------------------------------------------------------- commands


def ours_config(
    args, model_dir: Path, data_dir: Path, out: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "method": args.method,
        "output_dir": str(out),
        "seed": 0,
        "overwrite": True,
        "model": {"path": str(model_dir)},
        "data": {
            "path": str(data_dir),
            "prompt": PROMPT,
            "center_crop": True,
            "num_workers": args.num_workers,
        },
        "train": {
            "max_steps": args.steps,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "lr": LRS[args.method],
            "lr_scheduler": "constant",
            "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "report_to": "tensorboard",
            "log_every": 10,
            "checkpoint_every": 0,
        },
    }
    if args.cache != "default":
        latents, text = CACHES[args.cache]
        cfg["data"].update(cache_latents=latents, cache_text_embeddings=text)
    if args.use_8bit_adam:
        cfg["train"]["optimizer"] = "adamw8bit"
    if args.method == "lora":
        cfg["lora"] = {"rank": args.rank}
    if args.method == "textual_inversion":
        # textual_inversion.py flips at p=0.5 and repeats the images 100 times per epoch.
        cfg["data"].update(random_flip=True, repeats=100)
        cfg["ti"] = {
            "placeholder_token": PLACEHOLDER,
            "initializer_token": INITIALIZER,
            "learnable_property": "object",
        }
    for dotted, value in overrides.items():
        node = cfg
        *path, leaf = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


def reference_command(args, model_dir: Path, data_dir: Path, out: Path) -> list[str]:
    common = [
        "--pretrained_model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.batch_size),
        "--max_train_steps",
        str(args.steps),
        "--learning_rate",
        str(LRS[args.method]),
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        "0",
        "--seed",
        "0",
        "--mixed_precision",
        args.mixed_precision,
        "--checkpointing_steps",
        "1000000",
        "--report_to",
        "tensorboard",
        "--center_crop",
        "--dataloader_num_workers",
        str(args.num_workers),
    ]
    if args.gradient_checkpointing:
        common.append("--gradient_checkpointing")
    if args.use_8bit_adam:
        common.append("--use_8bit_adam")
    # Only some diffusers examples can cache latents (not train_dreambooth_lora_sdxl.py);
    # the others encode every step whatever ours does. Their text embeddings of the one
    # instance prompt are computed once in any case (with the encoders left on the device).
    if args.cache in ("latents", "all") and reference_accepts(args.reference, "--cache_latents"):
        common.append("--cache_latents")
    if args.method == "textual_inversion":
        return [
            str(args.reference),
            *common,
            "--train_data_dir",
            str(data_dir),
            "--placeholder_token",
            PLACEHOLDER,
            "--initializer_token",
            INITIALIZER,
            "--learnable_property",
            "object",
            "--save_steps",
            "1000000",
        ]
    extra = ["--rank", str(args.rank)] if args.method == "lora" else []
    return [
        str(args.reference),
        *common,
        *extra,
        "--instance_data_dir",
        str(data_dir),
        "--instance_prompt",
        PROMPT,
    ]


def reference_accepts(script: Path, flag: str) -> bool:
    """Whether the reference script defines `flag` (read from its argparse source)."""
    return f'"{flag}"' in Path(script).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- one run


def summarize_run(timer: dict[str, Any], launched: float, warmup: int) -> dict[str, Any]:
    """Numbers of one run from step_timer's stamps."""
    stamps = timer["stamps"]
    if not stamps:
        raise RuntimeError("the run made no optimizer step")
    # On CUDA the host stamps only say when a step was queued; the events are the truth.
    since_first = timer.get("gpu_seconds_since_first") or [s - stamps[0] for s in stamps]
    w = min(warmup, len(since_first) - 2)
    steady = (
        (len(since_first) - 1 - w) / (since_first[-1] - since_first[w])
        if w >= 0 and since_first[-1] > since_first[w]
        else None
    )
    # 1 / the median step time: robust to bursts of load from other processes on a shared
    # machine, which the mean rate above is not.
    gaps = [b - a for a, b in zip(since_first[w:], since_first[w + 1 :])]
    robust = 1 / statistics.median(gaps) if gaps and statistics.median(gaps) > 0 else None
    return {
        "steps": len(stamps),
        "steady_it_per_s": steady,
        "median_step_it_per_s": robust,
        "step_seconds": [round(g, 6) for g in gaps],
        "first_step_seconds": stamps[0] - launched,
        "peak_memory_bytes": timer.get("max_memory_allocated", timer["peak_rss_bytes"]),
        "peak_rss_bytes": timer["peak_rss_bytes"],
    }


def run_one(
    command: list[str], work: Path, name: str, warmup: int, timeout: int, env: dict[str, str]
) -> dict[str, Any]:
    timer_file = work / f"timer-{name}-{time.monotonic_ns()}.json"
    log_file = timer_file.with_suffix(".log")
    full = [sys.executable, str(HERE / "step_timer.py"), str(timer_file), *command]
    launched = time.time()
    with open(log_file, "w", encoding="utf-8") as log:
        proc = subprocess.run(full, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0 or not timer_file.is_file():
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    timer = json.loads(timer_file.read_text())
    result = summarize_run(timer, launched, warmup)
    result["device_name"] = timer.get("device_name")
    return result


# --------------------------------------------------------------------------- FLOPs


def unet_step_flops(
    model_dir: Path,
    method: str,
    batch: int,
    resolution: int,
    rank: int,
    device: str,
    dtype_name: str,
) -> float:
    """FLOPs of one UNet forward+backward as the method trains it (frozen weights get no
    weight gradients; LoRA adds its adapters; TI needs gradients only w.r.t. the text)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").to(device, dtype)
    unet.requires_grad_(method == "dreambooth")
    if method == "lora":
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    side = resolution // 2 ** (len(vae_config["block_out_channels"]) - 1)
    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, side, side, device=device, dtype=dtype)
    text = torch.randn(
        batch,
        77,
        cfg.cross_attention_dim,
        device=device,
        dtype=dtype,
        requires_grad=method == "textual_inversion",
    )
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    added = None
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.randn(batch, 6, device=device, dtype=dtype),
        }
    with FlopCounterMode(display=False) as counter:
        out = unet(latents, timesteps, text, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def peak_flops(device_name: str | None) -> float | None:
    for key, value in PEAK_BF16.items():
        if device_name and key in device_name:
            return value
    return None


# --------------------------------------------------------------------------- summary

KEYS = (
    "steady_it_per_s",
    "median_step_it_per_s",
    "fastest_step_it_per_s",
    "first_step_seconds",
    "peak_memory_bytes",
)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over repetitions; plus 1 / the shortest step of all repetitions, the speed
    with the least interference from other processes (timeit's rule on a busy machine)."""
    summary = {}
    for name, results in runs.items():
        results = [r for r in results if "error" not in r]
        numbers = {"failed_runs": len(runs[name]) - len(results)}
        for key in KEYS:
            values = [r[key] for r in results if r.get(key) is not None]
            numbers[key] = statistics.median(values) if values else None
        gaps = [g for r in results for g in r.get("step_seconds", []) if g > 0]
        numbers["fastest_step_it_per_s"] = 1 / min(gaps) if gaps else None
        summary[name] = numbers
    return summary


def add_ratios(summary: dict[str, Any]) -> None:
    if "ours" in summary and "reference" in summary:
        o, r = summary["ours"], summary["reference"]
        summary["ratio_ours_over_reference"] = {
            key: (o[key] / r[key]) if o[key] and r[key] else None for key in KEYS
        }


# --------------------------------------------------------------------------- main


def parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=("lora", "textual_inversion", "dreambooth"), required=True)
    p.add_argument("--reference", type=Path, help="the reference training script")
    p.add_argument("--only", choices=("ours", "reference"))
    p.add_argument(
        "--model",
        choices=("tiny", "sd15", *SDXL_MODELS),
        default="tiny",
        help="tiny / tiny-sdxl: the test pipelines; sd15 / sdxl: those architectures with "
        "random weights, built in code",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="cpu: hide any GPU from both trainers (the CPU path of a GPU script)",
    )
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of steady it/s")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--use-8bit-adam",
        action="store_true",
        help="bitsandbytes AdamW8bit: ours train.optimizer=adamw8bit, reference --use_8bit_adam",
    )
    p.add_argument(
        "--cache",
        choices=("default", *CACHES),
        default="default",
        help="what our trainer caches (each cache moves its encoder off the GPU); the "
        "reference gets --cache_latents where it has it",
    )
    p.add_argument("--no-flops", action="store_true", help="skip counting the UNet's FLOPs")
    p.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for our trainer in every run (repeatable)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run our trainer with these overrides, reported as NAME",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL threads of each run (CPU); default: 1 on CPU. On a shared "
        "machine more threads than free cores make every op spin-wait",
    )
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s, if not in the table")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.only != "ours" and args.reference is None:
        p.error("--reference is required (or --only ours)")
    if args.reference is not None and not args.reference.is_file():
        p.error(f"--reference {args.reference} does not exist")
    if args.model in SDXL_MODELS and args.method != "lora":
        p.error(f"--model {args.model} benchmarks --method lora (train_dreambooth_lora_sdxl.py)")
    return args


def _overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"override {item!r} must look like key.subkey=value")
        out[key.strip()] = parse_value(value)
    return out


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # both trainers and step_timer then see no GPU
        device = "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cuda" and device != "cuda":
            raise SystemExit("--device cuda: torch sees no GPU")
    work = args.work or Path(tempfile.mkdtemp(prefix="train-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = prepare(work, args.model, args.resolution, args.num_images)
    threads = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    base = _overrides(args.ours_set)
    trainers: dict[str, Any] = {}
    if args.only != "reference":
        trainers["ours"] = base
        for spec in args.variant:
            name, _, items = spec.partition(":")
            trainers[name] = {**base, **_overrides([i for i in items.split(",") if i])}
    if args.only != "ours":
        trainers["reference"] = None
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trainers}
    for rep in range(args.repeats):
        order = list(trainers) if rep % 2 == 0 else list(reversed(trainers))
        for name in order:
            out = work / f"out-{name}-{rep}"
            # A fresh output folder: a cache left there by an earlier run would make ours
            # skip the encoding its time to first step must include (a `data.cache_dir`
            # variant shares one on purpose).
            shutil.rmtree(out, ignore_errors=True)
            if trainers[name] is None:
                command = reference_command(args, model_dir, data_dir, out)
            else:
                cfg_path = work / f"{name}.yaml"
                cfg = ours_config(args, model_dir, data_dir, out, trainers[name])
                cfg_path.write_text(yaml.safe_dump(cfg))
                command = ["-m", "personalize", "train", str(cfg_path)]
            try:
                result = run_one(command, work, name, args.warmup, args.timeout, env)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                # One failing variant (e.g. compile on an unsupported stack) must not lose
                # the whole matrix: record it and go on.
                print(f"[{rep + 1}/{args.repeats}] {name} FAILED: {str(e)[:2000]}", flush=True)
                runs[name].append({"error": str(e)[-4000:]})
                continue
            runs[name].append(result)
            print(
                f"[{rep + 1}/{args.repeats}] {name}: {result['steady_it_per_s']:.3f} it/s, "
                f"first step {result['first_step_seconds']:.1f}s, "
                f"peak {result['peak_memory_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )

    summary = summarize(runs)
    device_name = next(
        (r["device_name"] for rs in runs.values() for r in rs if r.get("device_name")), None
    )
    flops = (
        None
        if args.no_flops
        else unet_step_flops(
            model_dir,
            args.method,
            args.batch_size,
            args.resolution,
            args.rank,
            device,
            args.mixed_precision,
        )
    )
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_name)
    for numbers in summary.values():
        its = numbers["steady_it_per_s"]
        numbers["unet_tflop_per_s"] = flops * its / 1e12 if its and flops else None
        numbers["mfu"] = flops * its / peak if its and peak and flops else None
    add_ratios(summary)
    result = {
        "method": args.method,
        "model": args.model,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "num_images": args.num_images,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "use_8bit_adam": args.use_8bit_adam,
        "cache": args.cache,
        "reference": args.reference.name if args.reference else None,
        # The reference's flags as run (paths left out): what it was asked to do.
        "reference_flags": [
            a
            for a in reference_command(args, model_dir, data_dir, work)[1:]
            if not a.startswith(str(work))
        ]
        if args.reference and args.only != "ours"
        else None,
        "ours_overrides": base,
        "variants": {k: v for k, v in trainers.items() if v is not None and k != "ours"},
        "device": device_name
        or f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "unet_step_flops": flops,
        "peak_flops": peak,
        "summary": summary,
        "runs": runs,
    }
    out = args.out or HERE / "results" / (
        f"{args.method}-{args.model}-{args.resolution}px-b{args.batch_size}-{device}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
