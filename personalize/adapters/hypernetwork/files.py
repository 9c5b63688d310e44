"""Hypernetwork files: the webui `.pt` (pickled dict, read with `weights_only=True` only)
and our `.safetensors` layout, both described in docs/hypernetwork.md; detection and
conversion between them."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from personalize.adapters.hypernetwork.network import (
    Hypernetwork,
    HypernetworkModule,
    HypernetworkOptions,
)
from personalize.errors import ArtifactError, ArtifactNotFoundError, HypernetworkError
from personalize.io import torch_load_reason

FORMAT_VERSION = "1"
# safetensors key: "<width>.<k|v>.<key of that module's state dict>", e.g. "768.k.linear.0.weight"
_SAFE_KEY = re.compile(r"^(\d+)\.([kv])\.(.+)$")
# Early webui files named the two Linear layers linear1/linear2 (no activation in between).
_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def save_hypernetwork(hn: Hypernetwork, path: str | Path) -> Path:
    """Write `hn` as a webui `.pt` or as `.safetensors`, chosen by the suffix (atomically)."""
    from personalize.io import atomic_save_safetensors, atomic_save_webui_pt

    path = Path(path)
    if path.suffix == ".pt":
        data: dict[Any, Any] = dict(hn.module_state_dicts())
        data.update(hn.file_fields())
        # The webui reads None and "linear" alike; ComfyUI refuses any name it does not list
        # ("Unsupported Hypernetwork format"), None included.
        if data.get("activation_func") is None:
            data["activation_func"] = "linear"
        return atomic_save_webui_pt(data, path)
    if path.suffix == ".safetensors":
        tensors = {
            f"{w}.{kv}.{key}": t.float().contiguous()
            for w, pair in hn.module_state_dicts().items()
            for kv, sd in zip("kv", pair)
            for key, t in sd.items()
        }
        metadata = {
            "personalize_artifact": "hypernetwork",
            "hypernetwork_format_version": FORMAT_VERSION,
            "hypernetwork_options": json.dumps(hn.file_fields()),
            "hypernetwork_widths": json.dumps(hn.widths),
        }
        return atomic_save_safetensors(tensors, path, metadata)
    raise HypernetworkError(f"{path}: a hypernetwork is saved as .pt (webui) or .safetensors")


def _torch_load(path: Path, peek: bool = False) -> Any:
    """torch.load with weights_only=True; a file that needs code to unpickle is refused."""
    # Peeking (for detection) memory-maps zip-format files, so it reads almost nothing.
    mmap = peek and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        detail = torch_load_reason(e)[:200]
        if not re.search(r"global|reduce|build|new object", detail, re.IGNORECASE):
            raise ArtifactError(
                f"{path}: not a readable PyTorch file (damaged, or not "
                f"written by torch.save): {detail}"
            ) from e
        raise ArtifactError(
            f"{path}: refused to load. This pickle file asks to run code or build objects "
            f"that a hypernetwork never contains ({detail[:200]}). personalize reads .pt "
            "files with torch.load(weights_only=True) only, because unpickling can run "
            "arbitrary code. Get the file from a source you trust, or as .safetensors."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        detail = str(e).strip() or f"{type(e).__name__}, the file is empty or cut short"
        raise ArtifactError(f"{path}: not a readable PyTorch file: {detail}") from e


def _is_webui_dict(obj: Any) -> bool:
    """Integer width keys holding (k, v) pairs, or the webui's option keys. Loose on purpose:
    a damaged hypernetwork should reach the loader's precise error, not "unknown kind"."""
    if not isinstance(obj, dict) or "string_to_param" in obj:
        return False
    if any(isinstance(k, int) and isinstance(v, (tuple, list)) for k, v in obj.items()):
        return True
    return any(isinstance(k, int) for k in obj) and "layer_structure" in obj


def _safetensors_info(path: Path) -> tuple[dict[str, str], list[str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ArtifactError(f"{path}: not a readable .safetensors file: {e}") from e


def _is_hypernetwork_safetensors(path: Path) -> bool:
    meta, keys = _safetensors_info(path)
    if meta.get("personalize_artifact") == "hypernetwork":
        return True
    return bool(keys) and all(_SAFE_KEY.match(k) for k in keys)


def find_hypernetwork_file(path: str | Path) -> Path | None:
    """The hypernetwork file at `path` (a file, or a training output folder), or None.
    A folder's .safetensors is preferred to its .pt: it needs no unpickling."""
    path = Path(path)
    if path.is_dir():
        for candidate in sorted(path.glob("*.safetensors")):
            if _is_hypernetwork_safetensors(candidate):
                return candidate
        for candidate in sorted(path.glob("*.pt")):
            if find_hypernetwork_file(candidate):
                return candidate
        return None
    if path.suffix == ".safetensors":
        return path if _is_hypernetwork_safetensors(path) else None
    if path.suffix in (".pt", ".pth"):
        return path if _is_webui_dict(_torch_load(path, peek=True)) else None
    return None


def _read_raw(path: Path) -> dict[Any, Any]:
    """Either format as the webui's dict: {width: (k_state, v_state), option: value, ...}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta, _ = _safetensors_info(path)
        raw: dict[Any, Any] = {}
        for key, tensor in load_file(str(path)).items():
            m = _SAFE_KEY.match(key)
            if not m:
                raise ArtifactError(f"{path}: key {key!r} is not <width>.<k|v>.<module key>")
            width, kv, rest = int(m.group(1)), m.group(2), m.group(3)
            raw.setdefault(width, ({}, {}))[0 if kv == "k" else 1][rest] = tensor
        try:
            raw.update(json.loads(meta.get("hypernetwork_options", "{}")))
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: metadata hypernetwork_options is not JSON: {e}") from e
        return raw
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ArtifactError(
            f"{path}: a webui hypernetwork file holds a dict, got {type(obj).__name__}"
        )
    return obj


def hypernetwork_from_dict(raw: dict[Any, Any], source: str = "<dict>") -> Hypernetwork:
    """Build a Hypernetwork from a webui-layout dict, with the webui's defaults for missing
    options (notably activate_output=True: files older than that option had it on)."""
    sizes = {k: v for k, v in raw.items() if isinstance(k, int)}
    if not sizes:
        raise ArtifactError(
            f"{source}: no hypernetwork modules (integer width keys such as "
            "768 mapping to a (k, v) pair of state dicts)"
        )
    try:
        options = HypernetworkOptions(
            layer_structure=list(raw.get("layer_structure") or [1, 2, 1]),
            activation_func=raw.get("activation_func"),
            is_layer_norm=bool(raw.get("is_layer_norm", False)),
            weight_initialization=raw.get("weight_initialization") or "Normal",
            activate_output=bool(raw.get("activate_output", True)),
            use_dropout=bool(raw.get("use_dropout", False)),
            last_layer_dropout=bool(raw.get("last_layer_dropout", False)),
            dropout_structure=raw.get("dropout_structure"),
        )
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{source}: malformed hypernetwork options: {e}") from e
    # The webui treats a file with any dropout in its structure as using dropout.
    options.use_dropout = options.use_dropout or any(options.dropout_structure)
    problems = options.problems()
    if problems:
        raise ArtifactError(f"{source}: " + "; ".join(problems))
    name = raw.get("name") or Path(source).stem
    hn = Hypernetwork(
        sorted(sizes),
        options,
        name=str(name),
        step=int(raw.get("step") or 0),
        sd_checkpoint=raw.get("sd_checkpoint"),
        sd_checkpoint_name=raw.get("sd_checkpoint_name"),
        optional_info=raw.get("optional_info"),
    )
    for width, pair in sizes.items():
        if not (
            isinstance(pair, (tuple, list))
            and len(pair) == 2
            and all(isinstance(sd, dict) for sd in pair)
        ):
            raise ArtifactError(
                f"{source}: width {width} must map to a (k, v) pair of state "
                f"dicts, got {type(pair).__name__}"
            )
        for kv, sd in zip("kv", pair):
            _load_module(getattr(hn.pair(width), kv), sd, f"{source}: width {width} {kv}", options)
    return hn


def _load_module(
    module: HypernetworkModule, state: dict[str, Any], where: str, options: HypernetworkOptions
) -> None:
    state = {_LEGACY_KEYS.get(k, k): v for k, v in state.items()}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"{where}: weights do not fit the architecture its options describe "
            f"(layer_structure={options.layer_structure}, activation_func="
            f"{options.activation_func!r}, is_layer_norm={options.is_layer_norm}, "
            f"activate_output={options.activate_output}, dropout_structure="
            f"{options.dropout_structure}): missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}. The file is damaged or its options do not match its weights."
        )
    module.load_state_dict({k: v.float() for k, v in state.items()})


def read_hypernetwork(path: str | Path) -> Hypernetwork:
    """Load a webui `.pt` or our `.safetensors` (or the one in a training output folder)."""
    path = Path(path)
    if not path.exists():
        raise ArtifactNotFoundError(f"hypernetwork file {path} does not exist")
    file = find_hypernetwork_file(path)
    if file is None:
        raise ArtifactError(
            f"{path} is not a hypernetwork (.pt in the webui layout or "
            ".safetensors with <width>.<k|v>.linear.<j> keys)"
        )
    return hypernetwork_from_dict(_read_raw(file), str(file))


def convert_hypernetwork(src: str | Path, dst: str | Path) -> Path:
    """Re-save a hypernetwork in the format of `dst`'s suffix (.pt <-> .safetensors)."""
    return save_hypernetwork(read_hypernetwork(src), dst)
