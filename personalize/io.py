"""Writing files the way a normal write does, but atomically.

Artifacts are written to a temporary name in the same folder and renamed into place, so a
kill mid-write never leaves a truncated file under the final name. Temporary-file helpers
(and safetensors' own writer) create files with mode 0600; a UI running as another user
(ComfyUI in a container, a shared webui install) then cannot read what we trained. Every
file that ends up under its final name here gets the mode a plain `open(path, "w")` would
give it: 0666 minus the process umask.

Every atomic file write of the package goes through `atomic_write`; the helpers below are
its common uses (text, JSON, PNG, safetensors, torch pickles).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def _umask() -> int:
    # os.umask can only be read by setting it; /proc shows it without a window in which
    # another thread would create files with a wrong mask.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def make_readable(path: str | Path) -> None:
    """Give `path` (a file, or every file under a folder) the normal new-file mode; for
    files another library wrote through a 0600 temporary file."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    mode = default_file_mode()
    for file in files:
        os.chmod(file, mode)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the block succeeds the file is given the
    normal new-file mode and renamed to `path`. On error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`atomic_write` for a folder: yield a temporary folder beside `path`; once the block
    succeeds its files get the normal mode and it replaces `path` (a folder there is removed
    first). On error the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        make_readable(tmp)  # diffusers' safetensors files are 0600
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2))


def atomic_save_png(image, path: str | Path) -> Path:
    """A PIL image as PNG (the format named, since the temporary name has no .png)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """The file gets the umask's mode (safetensors alone writes 0600)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=metadata,
        )
    return path


def atomic_torch_save(obj, path: str | Path) -> Path:
    import torch

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
    import torch

    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(obj, tmp, _use_new_zipfile_serialization=False)
    return path


# ------------------------------------------------------------------------------ reading


def refused_global(error: BaseException | None) -> str | None:
    """torch's reason when a `torch.load(weights_only=True)` in `error`'s chain refused a
    pickle for a global (code it would have to run), or None."""
    import pickle

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, pickle.UnpicklingError):
            for line in str(error).splitlines():
                if "Unsupported global" in line:
                    return line.strip()
        error = error.__cause__ or error.__context__
    return None


def torch_load_reason(error: BaseException) -> str:
    """The one line of torch's page-long load error that is news: the refused global, else
    the first line after "WeightsUnpickler error:", else the first line."""
    marker = "WeightsUnpickler error:"
    refused = refused_global(error)
    if refused:
        return refused.split(marker, 1)[-1].strip()
    text = str(error).split(marker, 1)[-1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__
