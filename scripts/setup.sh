#!/usr/bin/env bash
# Create .venv and install personalize with its dev extras, at the versions in requirements.lock.
# torch goes first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a
# CPU machine. requirements.lock is applied as constraints (-c): every package that is installed,
# directly or transitively, gets the exact version the test suite passed with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -c requirements.lock -e ".[dev]"
