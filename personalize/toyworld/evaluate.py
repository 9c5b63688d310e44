"""Does a pipeline draw what its prompt says? Measured with the toy-world classifier."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from personalize.toyworld.world import COLOR_NAMES, SHAPES


def full_prompts(n: int, seed: int) -> list[dict[str, str]]:
    """`n` (shape, color, background) triples with color != background, as prompts.

    Cycles through every shape evenly, so a small `n` still covers all of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        others = [c for c in COLOR_NAMES if c != color]
        background = others[rng.integers(len(others))]
        out.append(
            {
                "shape": shape,
                "color": color,
                "background": background,
                "prompt": f"a {color} {shape} on a {background} background",
            }
        )
    return out


@torch.no_grad()
def sample(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
) -> np.ndarray:
    """uint8 images (N, H, W, 3), image i from (prompts[i], seeds[i]) alone."""
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    chunks = []
    for start in range(0, len(prompts), batch_size):
        p = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        imgs = pipe(
            p,
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=res,
            width=res,
            output_type="np",
        ).images
        chunks.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(chunks)


def prompt_following(
    pipe, classifier, n: int = 56, seed: int = 1234, *, steps: int = 20, guidance_scale: float = 5.0
) -> dict[str, Any]:
    """Fraction of samples whose shape / color / background the classifier reads as the
    prompt asked, and all three at once."""
    items = full_prompts(n, seed)
    images = sample(
        pipe,
        [it["prompt"] for it in items],
        [seed + i for i in range(n)],
        steps=steps,
        guidance_scale=guidance_scale,
    )
    preds = classifier.predict(images)
    acc = {
        k: float(np.mean([p[k] == it[k] for p, it in zip(preds, items)]))
        for k in ("shape", "color", "background")
    }
    acc["all"] = float(
        np.mean(
            [
                all(p[k] == it[k] for k in ("shape", "color", "background"))
                for p, it in zip(preds, items)
            ]
        )
    )
    return {
        "n": n,
        "guidance_scale": guidance_scale,
        "steps": steps,
        "accuracy": acc,
        "images": images,
        "prompts": [it["prompt"] for it in items],
    }
