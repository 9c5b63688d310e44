"""Command line: `personalize {train,sample,demo,...}`; also `accelerate launch -m personalize`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from personalize.config import METHODS
from personalize.logs import configure_cli_logging, process_rank


def _cmd_train(args: argparse.Namespace) -> int:
    from personalize import load_config, train

    cfg = load_config(args.config, args.overrides)
    out = train(cfg)
    if process_rank() == 0:  # every rank returns here; one line is enough
        print(f"artifact saved in {out}")
    return 0


def parse_load_spec(spec: str) -> tuple[str, float | None]:
    """`PATH` or `PATH:STRENGTH` -> (path, strength or None). Only a trailing `:<number>` is
    a strength, so `C:\\loras\\x.safetensors` and other paths with ':' stay whole; a path
    that exists as written is always taken whole."""
    path, sep, tail = spec.rpartition(":")
    if not sep or not path or Path(spec).exists():
        return spec, None
    try:
        strength = float(tail)
    except ValueError:
        return spec, None
    if not math.isfinite(strength):
        raise argparse.ArgumentTypeError(f"strength must be a finite number, got {tail!r}")
    return path, strength


def _cmd_sample(args: argparse.Namespace) -> int:
    from personalize import load
    from personalize.inference import generate, make_grid
    from personalize.models import load_pipeline

    pipe = load_pipeline(args.model)
    if args.device:
        pipe.to(args.device)
    for artifact, strength in args.load or []:
        load(pipe, artifact, strength=args.strength if strength is None else strength)
    seeds = list(range(args.seed, args.seed + args.num_images))
    images = generate(
        pipe,
        args.prompt,
        seeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        negative_prompt=args.negative_prompt,
        progress=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p, row in enumerate(images):
        for seed, img in zip(seeds, row):
            img.save(out / f"prompt{p:02d}_seed{seed}.png")
    make_grid(images, row_labels=args.prompt, col_labels=[f"seed {s}" for s in seeds]).save(
        out / "grid.png"
    )
    print(f"wrote {len(args.prompt) * len(seeds)} images and grid.png to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from personalize.evaluation import evaluate, load_evaluation_config

    config = None
    overrides = []
    for item in args.items:  # the optional CONFIG.yaml, then dotted overrides
        if config is None and not overrides and "=" not in item:
            config = item
        else:
            overrides.append(item)
    flags = {
        "model": args.model,
        "output_dir": args.out,
        "overwrite": True if args.overwrite else None,
        "artifacts": args.artifact,
        "prompts": {
            "template_set": args.prompts if args.prompts in ("object", "live") else None,
            "file": args.prompts if args.prompts not in (None, "object", "live") else None,
            "token": args.token,
            "class_name": args.class_name,
            "count": args.num_prompts,
        },
        "generation": {
            "seeds": args.seeds,
            "num_images": args.num_images,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "scheduler": args.scheduler,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "device": args.device,
            "dtype": args.dtype,
        },
        "metrics": {
            "clip_model": args.clip_model,
            "dino_model": args.dino_model,
            "instance_data": args.instance_data,
        },
        "report": {
            "train_logs": args.train_log,
            "embed_images": True if args.embed_images else None,
        },
    }

    def given(d: dict) -> dict:  # flags left out do not override the config file
        return {
            k: given(v) if isinstance(v, dict) else v
            for k, v in d.items()
            if v is not None and (not isinstance(v, dict) or given(v))
        }

    cfg = load_evaluation_config(config, overrides, given(flags))
    summary = evaluate(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from personalize.demo import run_demo

    summary = run_demo(
        method=args.method, out=args.out, steps=args.steps, world=args.world, subject=args.subject
    )
    print(json.dumps(summary, indent=2))
    return 0


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each option's default, unless its help already says it in words (None defaults
    mean 'the model decides', which '(default: None)' would not tell)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a one-line usage error, exit code 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _image_side(text: str) -> int:
    """argparse type: a positive multiple of 8 (the VAE downsamples by 8)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="personalize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sample",
        help="generate images, optionally with learned artifacts",
        description="Generate --num-images images (seeds --seed, --seed+1, ...) for each "
        "--prompt with the base model and any loaded artifacts; write one PNG per image "
        "and grid.png to --out.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument(
        "--model", required=True, help="base model: diffusers folder, single file or hub id"
    )
    p.add_argument(
        "--load",
        action="append",
        type=parse_load_spec,
        metavar="PATH[:STRENGTH]",
        help="learned artifact to load (LoRA, embedding, hypernetwork, fine-tuned pipeline), "
        "optionally with its own strength, e.g. run/lora:0.7; repeatable, artifacts stack "
        "(default: none, the base model alone)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="strength of every --load that gives none of its own",
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt, one grid row each (repeatable)"
    )
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image of each prompt")
    p.add_argument("--num-images", type=_positive_int, default=4, help="images per prompt")
    p.add_argument("--steps", type=_positive_int, default=30, help="denoising steps per image")
    p.add_argument(
        "--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale"
    )
    p.add_argument(
        "--resolution",
        type=_image_side,
        default=None,
        help="image height and width in pixels (default: the model's own: 512 SD1, 768 SD 2.x-v)",
    )
    p.add_argument(
        "--device", default=None, help="e.g. cuda (default: the device the model loads on)"
    )
    p.add_argument("--out", default="outputs/samples", help="output folder")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "evaluate",
        help="base vs learned artifacts: grids, metrics, report.html",
        description="Generate the same prompts and seeds with the base model and "
        "each artifact, then write grids, metrics.json/.csv and report.html. "
        "Flags override the config file (see configs/evaluate.yaml).",
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml / key=value",
        help="optional YAML config, then dotted overrides (generation.num_inference_steps=20)",
    )
    p.add_argument("--model", help="base model: diffusers folder or single file")
    p.add_argument(
        "--artifact", action="append", help="PATH or LABEL=PATH of a learned artifact (repeatable)"
    )
    p.add_argument("--prompts", help="object | live (DreamBench templates) | a prompt file")
    p.add_argument("--token", help="identifier in the prompts (default sks)")
    p.add_argument("--class-name", help="subject class, e.g. dog")
    p.add_argument("--num-prompts", type=int, help="only the first N prompts")
    p.add_argument(
        "--seeds",
        type=lambda s: [int(x) for x in s.split(",")],
        help="comma-separated seeds, e.g. 0,1,2,3",
    )
    p.add_argument("--num-images", type=int, help="images per prompt (seeds 0..N-1)")
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--scheduler", help="diffusers scheduler: DDIM, EulerDiscrete, ...")
    p.add_argument("--resolution", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--clip-model", help="local CLIP folder for CLIP-T/CLIP-I")
    p.add_argument("--dino-model", help="local DINO ViT folder for DINO/PRES/DIV")
    p.add_argument("--instance-data", help="the real subject images")
    p.add_argument("--train-log", action="append", help="train_log.jsonl or run folder")
    p.add_argument("--embed-images", action="store_true", help="inline images in report.html")
    p.add_argument("--overwrite", action="store_true", help="regenerate existing images")
    p.add_argument("--out", help="output folder (default outputs/eval)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "demo", help="personalize the shipped toy-world model offline and show before/after"
    )
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the world's per-method default)",
    )
    p.add_argument(
        "--world",
        choices=("toy", "tiny"),
        default="toy",
        help="toy: the pretrained toy world (default); tiny: a random tiny model "
        "built in code (seconds; shows the plumbing, learns nothing real)",
    )
    p.add_argument(
        "--subject",
        default="striped_heart",
        help="toy-world subject: striped_heart, two_color_star, spotted_circle",
    )
    p.set_defaults(func=_cmd_demo)

    from personalize.tools.cli import add_tool_commands  # merge, lora resize|extract

    add_tool_commands(sub)
    return parser


def _parent_num_processes() -> int | None:
    """`--num_processes N` from the command line of the launcher that started us (Linux)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    args = raw.decode(errors="replace").split("\0")
    for i, arg in enumerate(args):
        value = None
        if arg == "--num_processes" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--num_processes="):
            value = arg.split("=", 1)[1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def _cpu_ranks_to_start(env: dict[str, str]) -> int | None:
    """accelerate's simple launcher (`accelerate launch --cpu --num_processes N`) starts ONE
    process unless mpirun is set up. Recognize that case and return N, so we can start the
    N gloo ranks the user asked for instead of silently training on one."""
    cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    has_ranks = any(k in env for k in ("WORLD_SIZE", "RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not (cpu and "MASTER_ADDR" in env and not has_ranks):
        return None
    n = _parent_num_processes()
    if n is None:
        logging.getLogger("personalize").warning(
            "accelerate launch --cpu runs a single process without mpirun, and the number "
            "of processes could not be read; for N CPU processes use launch/cpu_2proc.sh"
        )
    return n if n and n > 1 else None


def _start_cpu_ranks(n: int, argv: list[str]) -> int:
    env = dict(os.environ)
    logging.getLogger("personalize").info(
        "starting %d CPU processes (gloo) with torch.distributed.run", n
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_addr",
        env["MASTER_ADDR"],
        "--master_port",
        env.get("MASTER_PORT", "29500"),
        "-m",
        "personalize",
        *argv,
    ]
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    configure_cli_logging()
    ranks = _cpu_ranks_to_start(dict(os.environ))
    if ranks:
        return _start_cpu_ranks(ranks, argv)
    from tqdm.contrib.logging import logging_redirect_tqdm

    from personalize.errors import PersonalizeError

    try:
        # Log lines printed while a progress bar is on screen go above it, not onto its line.
        with logging_redirect_tqdm():
            return args.func(args)
    except PersonalizeError as e:
        # Every error the package raises for the user: one line, no traceback.
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
