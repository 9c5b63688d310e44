"""SIGTERM/SIGINT save a checkpoint and exit cleanly; a failed save loses nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import base_config
from helpers import ROOT, launch_two_processes

from personalize import train
from personalize.config import from_dict
from personalize.training import checkpoint as ckpt
from personalize.training.checkpoint import CheckpointError


def _logged_step(out: Path) -> int:
    log = out / "train_log.jsonl"
    if not log.is_file():
        return 0
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    return max((r.get("step", 0) for r in rows), default=0)


def _start(cmd: list[str], out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while _logged_step(out) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.02)


def _config(tmp_path: Path, model: Path, data: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(base_config(model, data, out, train={"max_steps": 100000, "log_every": 1}))
    )
    return cfg, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(sig, tiny_model_dir, instance_dir, tmp_path):
    cfg, out = _config(tmp_path, tiny_model_dir, instance_dir)
    proc = _start([sys.executable, "-m", "personalize", "train", str(cfg)], out)
    _wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert "Continue with resume=latest" in err
    saved = ckpt.complete_checkpoints(out)
    assert len(saved) == 1
    step = ckpt.read_state(saved[0])["step"]
    assert step >= 3 and step == _logged_step(out)
    # The run goes on from there.
    done = train(
        from_dict(
            base_config(
                tiny_model_dir,
                instance_dir,
                out,
                resume="latest",
                train={"max_steps": step + 2, "log_every": 1},
            )
        )
    )
    assert json.loads((done / "summary.json").read_text())["step"] == step + 2


def test_two_processes_stop_together_on_a_group_signal(tiny_model_dir, instance_dir, tmp_path):
    cfg, out = _config(tmp_path, tiny_model_dir, instance_dir)
    proc = _start(
        launch_two_processes("personalize", "train", str(cfg)),
        out,
    )
    _wait_for_step(proc, out, 3)
    # What a terminal's Ctrl-C or a scheduler does: the signal reaches every process.
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    saved = ckpt.complete_checkpoints(out)
    assert len(saved) == 1, err[-3000:]
    assert (saved[0] / "random_states_0.pkl").is_file()
    assert (saved[0] / "random_states_1.pkl").is_file()
    assert err.count("stopped by SIGTERM") == 2  # both ranks agreed on the same stop


def test_failed_checkpoint_save_keeps_the_previous_one(
    tiny_model_dir, instance_dir, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    train(
        from_dict(
            base_config(
                tiny_model_dir, instance_dir, out, train={"max_steps": 2, "checkpoint_every": 2}
            )
        )
    )
    before = ckpt.complete_checkpoints(out)
    assert [p.name for p in before] == ["step-000002"]

    from accelerate import Accelerator

    def disk_full(self, output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", disk_full)
    cfg = from_dict(
        base_config(
            tiny_model_dir,
            instance_dir,
            out,
            resume="latest",
            train={"max_steps": 4, "checkpoint_every": 2},
        )
    )
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        train(cfg)
    assert "step-000002 is intact" in str(info.value)
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-000002"]
    assert not list(ckpt.checkpoint_root(out).glob(".tmp-step-*"))
    assert ckpt.read_state(ckpt.resolve_resume(out, "latest"))["step"] == 2


def test_one_failing_rank_does_not_hang_the_other(tiny_model_dir, instance_dir, tmp_path):
    cfg, out = _config(tmp_path, tiny_model_dir, instance_dir)
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PERSONALIZE_FAULT="error-rank1:3"
    )
    started = time.monotonic()
    proc = subprocess.run(
        launch_two_processes("personalize", "train", str(cfg)),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,
    )
    assert proc.returncode != 0
    assert "injected fault error-rank1 at step 3" in proc.stderr
    # Rank 0 was stopped by the launcher, not left waiting for rank 1 until a timeout.
    assert time.monotonic() - started < 120
