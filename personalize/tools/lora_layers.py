"""LoRA files as plain per-layer (down, up, alpha) triples, in either on-disk layout.

Two layouts are read and written:

* ours (diffusers/peft): `pytorch_lora_weights.safetensors` with keys
  `unet.<module>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`), the scale in the
  file's `lora_adapter_metadata` (r, lora_alpha, rank_pattern, alpha_pattern);
* kohya (webui, ComfyUI, kohya's scripts): `lora_unet_<module with . -> _>.lora_down.weight`
  [r, in(, k, k)], `.lora_up.weight` [out, r(, 1, 1)] and `.alpha` (scale alpha / r); the text
  encoder's layers as `lora_te_text_model_encoder_layers_{i}_...` (SD 1/2).

SDXL (adapters/kohya.py): ours adds `text_encoder_2.`; kohya names the UNet by the original
module tree (`lora_unet_input_blocks_4_1_...`) and the encoders `lora_te1_` / `lora_te2_`.
Kohya names read from a file are written back unchanged.

Writers move each layer's scale into its weights: ours declares alpha == rank (scale 1)
per module, kohya one alpha for all layers, so a file means the same to every client
whatever its handling of alphas and patterns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from personalize.adapters.kohya import kohya_name
from personalize.adapters.lora_family import lora_family
from personalize.errors import ArtifactNotFoundError, LoraFileError
from personalize.io import atomic_save_safetensors
from personalize.models import SD1, SD2, SDXL

PEFT = "peft"
KOHYA = "kohya"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_METADATA_KEY = "lora_adapter_metadata"
_LYCORIS_ONLY = (
    "lora resize/extract rewrite LoRA files only (their factors are not a product of two "
    "low-rank matrices); personalize merge bakes LoHa/LoKr"
)


@dataclass
class LoraLayer:
    down: torch.Tensor  # [r, in] or [r, in, k, k]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this layer adds, flattened to [out, in * k * k], in float64."""
        up = self.up.reshape(self.up.shape[0], -1).double()
        down = self.down.reshape(self.rank, -1).double()
        return (up @ down) * self.scale


@dataclass
class LoraFile:
    """Layers keyed `unet.<module>` / `text_encoder.<module>` / `text_encoder_2.<module>`
    (peft) or by kohya base name."""

    layers: dict[str, LoraLayer]
    layout: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        return lora_family(self.layers, self.metadata)


# ------------------------------------------------------------------------------ reading


def find_lora_file(path: str | Path) -> Path:
    """The LoRA file of `path`: the file itself, or our file in a training output folder."""
    from personalize.adapters.lora import KOHYA_WEIGHTS, LORA_WEIGHTS, LYCORIS_WEIGHTS

    path = Path(path)
    if path.is_dir():
        for name in (LORA_WEIGHTS, KOHYA_WEIGHTS):
            if (path / name).is_file():
                return path / name
        if (path / LYCORIS_WEIGHTS).is_file():
            raise LoraFileError(f"{path} holds a LoHa/LoKr ({LYCORIS_WEIGHTS}): {_LYCORIS_ONLY}")
        raise LoraFileError(f"{path} holds no {LORA_WEIGHTS} or {KOHYA_WEIGHTS}")
    if not path.is_file():
        raise ArtifactNotFoundError(f"LoRA {path} does not exist")
    if path.suffix != ".safetensors":
        raise LoraFileError(f"{path}: LoRA tools read .safetensors files only")
    return path


def read_lora(path: str | Path) -> LoraFile:
    from safetensors import safe_open

    file = find_lora_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise LoraFileError(f"{file} is not a readable .safetensors file: {e}") from e
    if any(".lora_down." in k for k in tensors):
        return LoraFile(_read_kohya(tensors, file), KOHYA, metadata)
    if any(".lora_A." in k for k in tensors):
        return LoraFile(_read_peft(tensors, metadata, file), PEFT, metadata)
    if any(".hada_" in k or ".lokr_" in k for k in tensors):
        raise LoraFileError(f"{file} is a LoHa/LoKr: {_LYCORIS_ONLY}")
    raise LoraFileError(
        f"{file}: no lora_A/lora_B (diffusers/peft) or lora_down/lora_up (kohya) keys"
    )


def _refuse_unknown(keys, file: Path, known: tuple[str, ...]) -> None:
    unknown = [k for k in keys if not k.endswith(known)]
    if unknown:
        raise LoraFileError(
            f"{file}: keys this tool cannot rewrite (DoRA, LoCon/LoHa, biases, ...): "
            f"{unknown[:3]}; only plain LoRA layers are supported"
        )


def _read_kohya(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, LoraLayer]:
    _refuse_unknown(tensors, file, (".lora_down.weight", ".lora_up.weight", ".alpha"))
    layers = {}
    for key in tensors:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        down, up = tensors[key], tensors.get(base + ".lora_up.weight")
        if up is None:
            raise LoraFileError(f"{file}: {base} has lora_down but no lora_up")
        alpha = tensors.get(base + ".alpha")
        layers[base] = LoraLayer(down, up, float(alpha) if alpha is not None else down.shape[0])
    return layers


def _pattern_value(patterns: dict, module: str, default):
    # peft's rule: a pattern key matches a module name it ends (after a dot).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], file: Path
) -> dict[str, LoraLayer]:
    _refuse_unknown(tensors, file, (".lora_A.weight", ".lora_B.weight"))
    info = json.loads(metadata.get(_METADATA_KEY) or "{}")
    layers = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        base = key[: -len(".lora_A.weight")]
        component, _, module = base.partition(".")
        if component not in COMPONENTS:
            raise LoraFileError(
                f"{file}: key {key} is not under unet., text_encoder. or text_encoder_2."
            )
        down, up = tensors[key], tensors.get(base + ".lora_B.weight")
        if up is None:
            raise LoraFileError(f"{file}: {base} has lora_A but no lora_B")
        rank = down.shape[0]
        # peft: alpha from alpha_pattern, else lora_alpha. No metadata at all: diffusers
        # takes alpha == rank (scale 1) for every module.
        alpha = rank
        if info:
            default = info.get(f"{component}.lora_alpha", rank)
            alpha = _pattern_value(info.get(f"{component}.alpha_pattern") or {}, module, default)
            if info.get(f"{component}.use_rslora"):  # scale alpha / sqrt(r), as alpha' / r
                alpha = alpha * rank**0.5
        layers[base] = LoraLayer(down, up, float(alpha))
    return layers


# ------------------------------------------------------------------------------ writing


def _with_scale(
    layer: LoraLayer, scale: float, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) to be declared with `scale`: the rest of the layer's own scale is moved
    into the weights, split evenly between the two."""
    factor = layer.scale / scale
    root, sign = abs(factor) ** 0.5, (1.0 if factor >= 0 else -1.0)
    dtype = dtype or layer.down.dtype
    down = (layer.down.double() * root).to(dtype).contiguous()
    up = (layer.up.double() * root * sign).to(dtype).contiguous()
    return down, up


def _most_common(values: list[int]) -> int:
    return max(set(values), key=values.count)


class _SdxlUnetLayout:
    """What SDXL's original UNet names depend on (adapters/kohya.py sdxl_unet_path), for a
    file written without the model at hand: SDXL base's 2 layers per down block and
    cross-attention up blocks but the last (which has no upsampler to name)."""

    layers_per_block = 2
    up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


SDXL_UNET_LAYOUT = _SdxlUnetLayout()
_KOHYA_VERSION_OF = {SD1: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}


def write_kohya(
    layers: dict[str, LoraLayer],
    path: str | Path,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    sdxl_unet=None,
) -> Path:
    """Layers keyed by kohya base name (kept), or by peft key (renamed), as a kohya file.
    An SDXL LoRA's peft keys get SDXL's names: from `sdxl_unet` (the UNet's config) when
    given, else SDXL base's layout.

    Every layer gets the same alpha (the most common rank) and the weights carry the rest
    of its scale: diffusers' kohya loader mis-maps per-layer alphas of some blocks
    (mid_block), and one alpha reads the same in every client."""
    family = lora_family(layers, metadata)
    if family == SDXL and sdxl_unet is None:
        sdxl_unet = SDXL_UNET_LAYOUT
    alpha = _most_common([layer.rank for layer in layers.values()])
    tensors = {}
    for key, layer in layers.items():
        name = key if key.startswith("lora_") else kohya_name(key, sdxl_unet)
        down, up = _with_scale(layer, alpha / layer.rank, dtype)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=down.dtype)
    ranks = {layer.rank for layer in layers.values()}
    meta = dict(metadata or {})
    meta.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
            "ss_network_alpha": str(alpha),
        }
    )
    meta.setdefault("ss_base_model_version", _KOHYA_VERSION_OF.get(family or SD1, "sd_v1"))
    return atomic_save_safetensors(tensors, path, meta)


def write_peft(
    layers: dict[str, LoraLayer],
    path: str | Path,
    extra_metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> Path:
    """Layers keyed `unet.<module>` / `text_encoder.<module>` / `text_encoder_2.<module>` as
    our diffusers-format file (SDXL's: StableDiffusionXLPipeline.save_lora_weights' keys),
    with per-module ranks spelled out in the metadata (peft's rank_pattern/alpha_pattern)."""
    tensors, info = {}, {}
    for component in COMPONENTS:
        mine = {k: v for k, v in layers.items() if k.startswith(component + ".")}
        if not mine:
            continue
        modules = {k.partition(".")[2]: layer.rank for k, layer in mine.items()}
        r = _most_common(list(modules.values()))
        pattern = {m: rank for m, rank in modules.items() if rank != r}
        info.update(
            {
                f"{component}.r": r,
                f"{component}.lora_alpha": r,
                f"{component}.rank_pattern": pattern,
                f"{component}.alpha_pattern": dict(pattern),
                f"{component}.target_modules": sorted(modules),
                f"{component}.use_dora": False,
            }
        )
        for key, layer in mine.items():
            down, up = _with_scale(layer, 1.0, dtype)
            tensors[f"{key}.lora_A.weight"] = down
            tensors[f"{key}.lora_B.weight"] = up
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(info, indent=2, sort_keys=True)}
    metadata.update(extra_metadata or {})
    return atomic_save_safetensors(tensors, path, metadata)


# ------------------------------------------------------------------------------ SVD


def choose_rank(
    singular: torch.Tensor, rank: int | None, energy: float | None, total: float | None = None
) -> int:
    """A fixed rank (capped by the layer's size), or the smallest keeping `energy` of the
    squared singular values (of `total`, the squared Frobenius norm, when only the leading
    values are known)."""
    if rank is not None:
        return max(1, min(rank, singular.numel()))
    squares = singular.double() ** 2
    total = float(squares.sum()) if total is None else total
    if total == 0:
        return 1
    share = torch.cumsum(squares, 0) / total
    k = int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1
    return min(k, singular.numel())


# Randomized SVD pays off only well below full rank; above this share of the smaller side
# the full (exact) SVD is used.
_LOWRANK_SHARE = 0.25


def leading_svd(
    delta: torch.Tensor, rank: int | None, energy: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, s, vh) holding at least what `rank` / `energy` needs. A full SVD of SD's biggest
    layers ([1280, 11520]) takes a minute on a CPU; a randomized one of the leading q values
    (Halko et al., 4 power iterations, seeded: the same file every run) takes a second. For
    `energy` q doubles until the leading values hold that share of the Frobenius norm."""
    small = min(delta.shape)
    total = float(delta.double().pow(2).sum())
    q = rank if rank is not None else 16
    while q + 8 < _LOWRANK_SHARE * small:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(delta, q=q + 8, niter=4)
        if rank is not None or float((s.double() ** 2).sum()) >= energy * total:
            return u, s, v.T
        q *= 2
    return torch.linalg.svd(delta, full_matrices=False)


def factor(
    delta: torch.Tensor | None,
    shape_down: tuple[int, ...],
    shape_up: tuple[int, ...],
    rank: int | None,
    energy: float | None,
    u: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    vh: torch.Tensor | None = None,
) -> tuple[LoraLayer, float]:
    """The best rank-k LoRA layer for `delta` [out, in*k*k] (Eckart-Young) and the share of
    its squared Frobenius norm it keeps. `shape_down`/`shape_up` give the trailing dims
    ((in,) or (in, k, k); () or (1, 1)). Pass the full (u, s, vh) when already computed."""
    if s is None:
        total = float(delta.double().pow(2).sum())
        u, s, vh = leading_svd(delta, rank, energy)
    else:
        total = float((s.double() ** 2).sum())
    k = choose_rank(s, rank, energy, total)
    kept = min(1.0, float((s[:k].double() ** 2).sum()) / total) if total > 0 else 1.0
    root = s[:k].clamp(min=0).sqrt()
    up = (u[:, :k] * root).reshape(u.shape[0], k, *shape_up)
    down = (root[:, None] * vh[:k]).reshape(k, *shape_down)
    return LoraLayer(down.float(), up.float(), float(k)), kept
