"""The LoRA tool subcommands: `personalize merge`, `personalize lora resize|extract`."""

from __future__ import annotations

import argparse
import json


def _cmd_merge(args: argparse.Namespace) -> int:
    from personalize.tools.lora_merge import merge, parse_load

    # A PersonalizeError goes up to personalize.cli.main, which prints it as one line.
    loads = [parse_load(s) for s in args.load]
    out = merge(args.model, loads, args.out, args.single_file, args.dtype)
    print(f"merged pipeline saved in {out}")
    return 0


def _print_summary(written, summary) -> None:
    print(summary.line())
    print(json.dumps({"files": [str(p) for p in written], **summary.as_dict()}, indent=2))


def _cmd_resize(args: argparse.Namespace) -> int:
    from personalize.tools.lora_resize import resize_file

    written, summary = resize_file(args.input, args.out, args.rank, args.energy)
    _print_summary(written, summary)
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from personalize.tools.lora_extract import extract

    written, summary = extract(
        args.base,
        args.tuned,
        args.out,
        args.rank,
        args.energy,
        all_layers=args.all_layers,
        device=args.device,
    )
    _print_summary(written, summary)
    return 0


def _rank_or_energy(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", type=int, help="the same rank for every layer")
    target.add_argument(
        "--energy",
        type=float,
        help="per layer, the smallest rank keeping this share (0-1] of the squared "
        "singular values, e.g. 0.95",
    )


def add_tool_commands(sub) -> None:
    """Register `merge` and `lora {resize,extract}` on the main parser's subparsers."""
    p = sub.add_parser(
        "merge",
        help="bake LoRAs into a base model: a diffusers pipeline (and a single file)",
        description="Load each LoRA (ours or kohya/webui) at its strength, fuse them into "
        "the base weights, and save a plain diffusers pipeline folder.",
    )
    p.add_argument("--model", required=True, help="base: diffusers folder or single file")
    p.add_argument(
        "--load",
        action="append",
        required=True,
        metavar="PATH[:STRENGTH]",
        help="LoRA file or training output folder, optional strength (repeatable)",
    )
    p.add_argument("--out", required=True, help="new folder for the merged pipeline")
    p.add_argument(
        "--single-file",
        action="store_true",
        help="also write OUT/<OUT name>.safetensors in the original SD 1.x/2.x layout "
        "(not for SDXL yet)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="precision of the saved weights (default: the base model's)",
    )
    p.set_defaults(func=_cmd_merge)

    lora = sub.add_parser("lora", help="LoRA tools: resize, extract")
    tools = lora.add_subparsers(dest="lora_command", required=True)
    p = tools.add_parser(
        "resize",
        help="lower a LoRA's rank by SVD of each layer's weight change",
        description="kohya file in: kohya file out (OUT, or OUT/<input name> when OUT is a "
        "folder). Our pytorch_lora_weights.safetensors in: folder OUT with ours and its "
        "kohya copy.",
    )
    p.add_argument("input", help="LoRA .safetensors or training output folder")
    _rank_or_energy(p)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_resize)

    p = tools.add_parser(
        "extract",
        help="a LoRA from the difference of a fine-tuned model and its base",
        description="SVD of the weight change of every Linear/Conv layer of the UNet and "
        "text encoder; writes OUT/pytorch_lora_weights.safetensors and OUT/lora_kohya."
        "safetensors.",
    )
    p.add_argument("--base", required=True, help="the base model (folder or single file)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model, e.g. DreamBooth output")
    _rank_or_energy(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--all-layers",
        action="store_true",
        help="also the time embedding and conv_in/conv_out (diffusers loads them; webui "
        "and kohya's extractor do not use them)",
    )
    p.add_argument("--device", default=None, help="where to run the SVDs, e.g. cuda")
    p.set_defaults(func=_cmd_extract)
