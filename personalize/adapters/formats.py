"""Safe, atomic reading and writing of artifact files."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write to a temporary name in the same folder, then rename: a kill mid-write never
    leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata
    )
    os.replace(tmp, path)
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
