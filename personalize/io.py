"""Writing files the way a normal write does, but atomically.

Artifacts are written to a temporary name in the same folder and renamed into place, so a
kill mid-write never leaves a truncated file under the final name. Temporary-file helpers
(and safetensors' own writer) create files with mode 0600; a UI running as another user
(ComfyUI in a container, a shared webui install) then cannot read what we trained. Every
file that ends up under its final name here gets the mode a plain `open(path, "w")` would
give it: 0666 minus the process umask.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
