"""Safe, atomic reading and writing of artifact files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from personalize.io import atomic_write


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write to a temporary name in the same folder, then rename: a kill mid-write never
    leaves a truncated file under the final name. The file gets the umask's mode (safetensors
    alone writes 0600)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return path


def atomic_save_webui_pt(obj, path: str | Path) -> Path:
    """A `.pt` the AUTOMATIC1111 webui opens with its safe unpickler on (the default).

    Its check (`modules/safe.py`) accepts a zip-format file only when every entry is
    `<dir>/data.pkl`, `<dir>/version` or `<dir>/data/<n>`; current torch.save adds
    `.format_version`, `.storage_alignment`, `byteorder` and `.data/serialization_id`, so
    the webui refuses it ("bad file inside ..."). The legacy (non-zip) serialization has no
    entries to refuse, holds the same pickle, and still loads with
    `torch.load(weights_only=True)` (ComfyUI, diffusers, personalize)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp, _use_new_zipfile_serialization=False)
    return path
