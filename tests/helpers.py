"""What several test files share: the repository root and the 2-process launch command."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port no one listens on now, so tests launched in parallel do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(*args: str, multi_gpu: bool = False) -> list[str]:
    """`accelerate launch` of `python -m <args>` on two CPU ranks (gloo), on a free port.

    `multi_gpu=True` asks for the distributed launcher explicitly (the run still uses the
    CPU when ACCELERATE_USE_CPU=1 is in the environment); otherwise `--cpu`.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu" if multi_gpu else "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        *args,
    ]
