"""`personalize lora resize`: lower a LoRA's rank by SVD of each layer's weight change.

Each layer's delta (up @ down * alpha / r) has rank <= r; its best rank-k approximation
(Eckart-Young) is its first k singular triples. The SVD is done on an r x r core instead of
the full [out, in*k*k] matrix: with up = Qu Ru and down^T = Qd Rd (thin QR),
delta = Qu (Ru Rd^T) Qd^T, so only Ru Rd^T needs an SVD. Exact, and fast for big layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from personalize.errors import ConfigError
from personalize.tools.lora_layers import (
    KOHYA,
    LoraFile,
    LoraLayer,
    factor,
    read_lora,
    write_kohya,
    write_peft,
)

logger = logging.getLogger(__name__)


@dataclass
class RankSummary:
    """What a resize or extract kept, per file."""

    layers: int
    ranks: list[int]
    energies: list[float]  # per layer: share of squared singular values kept
    bytes_before: int | None = None
    bytes_after: int | None = None

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "mean_rank": sum(self.ranks) / max(1, len(self.ranks)),
            "min_rank": min(self.ranks, default=0),
            "max_rank": max(self.ranks, default=0),
            "mean_energy": sum(self.energies) / max(1, len(self.energies)),
            "min_energy": min(self.energies, default=1.0),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
        }

    def line(self) -> str:
        d = self.as_dict()
        size = ""
        if d["bytes_before"] and d["bytes_after"]:
            size = f", {d['bytes_before'] / 1e6:.2f} MB -> {d['bytes_after'] / 1e6:.2f} MB"
        return (
            f"{d['layers']} layers, rank mean {d['mean_rank']:.1f} (min {d['min_rank']}, "
            f"max {d['max_rank']}), energy kept mean {d['mean_energy']:.4f} "
            f"(min {d['min_energy']:.4f}){size}"
        )


def check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}")


def resize_layer(
    layer: LoraLayer, rank: int | None, energy: float | None
) -> tuple[LoraLayer, float]:
    up = layer.up.reshape(layer.up.shape[0], -1).double() * layer.scale
    down = layer.down.reshape(layer.rank, -1).double()
    qu, ru = torch.linalg.qr(up)
    qd, rd = torch.linalg.qr(down.T)
    u_core, s, vh_core = torch.linalg.svd(ru @ rd.T)
    u, vh = qu @ u_core, vh_core @ qd.T
    new, kept = factor(
        None, tuple(layer.down.shape[1:]), tuple(layer.up.shape[2:]), rank, energy, u, s, vh
    )
    dtype = layer.down.dtype
    return LoraLayer(new.down.to(dtype), new.up.to(dtype), new.alpha), kept


def resize(lora: LoraFile, rank: int | None, energy: float | None) -> tuple[LoraFile, RankSummary]:
    check_target(rank, energy)
    layers, ranks, energies = {}, [], []
    for key, layer in lora.layers.items():
        layers[key], kept = resize_layer(layer, rank, energy)
        ranks.append(layers[key].rank)
        energies.append(kept)
    return LoraFile(layers, lora.layout, lora.metadata), RankSummary(len(layers), ranks, energies)


def resize_file(
    src: str | Path, out: str | Path, rank: int | None = None, energy: float | None = None
) -> tuple[list[Path], RankSummary]:
    """Resize `src`; a kohya file is written as a kohya file at `out`, ours as a folder `out`
    holding our file and its kohya copy. Returns the files written and the summary."""
    from personalize.adapters.lora import KOHYA_WEIGHTS, LORA_WEIGHTS
    from personalize.tools.lora_layers import find_lora_file

    src_file = find_lora_file(src)
    lora = read_lora(src_file)
    resized, summary = resize(lora, rank, energy)
    out = Path(out)
    target = f"rank {rank}" if rank is not None else f"energy {energy}"
    note = {"personalize_resized_from": src_file.name, "personalize_resize": target}
    if lora.layout == KOHYA:
        if out.suffix != ".safetensors":
            out = out / src_file.name
        meta = {k: v for k, v in lora.metadata.items() if not k.startswith("ss_network_")}
        written = [write_kohya(resized.layers, out, {**meta, **note})]
    else:
        written = [
            write_peft(resized.layers, out / LORA_WEIGHTS, note),
            write_kohya(resized.layers, out / KOHYA_WEIGHTS, note, dtype=torch.float32),
        ]
    summary.bytes_before = src_file.stat().st_size
    summary.bytes_after = written[0].stat().st_size
    logger.info("resized %s (%s): %s", src_file, target, summary.line())
    return written, summary
