#!/usr/bin/env bash
# Resolve the NEWEST releases of every dependency in a scratch venv and run the test suite there,
# so that a break on the package index is found before users find it. Not part of CI: the index
# moves, and CI installs from requirements.lock.
#
#   bash scripts/check_newest.sh                 # report versions that differ from the lock + test
#   bash scripts/check_newest.sh --update-lock   # ... and, if every test passes, rewrite the lock
#   PYTEST_ARGS="-x tests/test_lora.py" bash scripts/check_newest.sh   # a subset
set -euo pipefail
cd "$(dirname "$0")/.."
update=0
[ "${1:-}" = "--update-lock" ] && update=1
PYTHON="${PYTHON:-python3}"
venv="$(mktemp -d)/newest"
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
# Whatever the index resolves today, torch aside: an eager upgrade would replace the CPU wheel
# with the newest CUDA build (gigabytes of nvidia-* packages). Test a new torch on purpose with
# TORCH_VERSION=...
echo "torch==${TORCH_VERSION:-2.13.0}" > "$venv.torch"
"$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager \
  -c "$venv.torch" -e ".[dev]"
"$venv/bin/python" -m pip freeze --exclude-editable \
  | grep -v -iE '^(torch|pip|setuptools|wheel)==' | sort -f > "$venv.freeze"
echo "== versions that differ from requirements.lock (lock -> newest)"
grep -v '^#' requirements.lock | sort -f | diff - "$venv.freeze" | grep '^[<>]' || echo "(none)"
echo "== tests on the newest versions"
set +e
# shellcheck disable=SC2086
"$venv/bin/python" -m pytest -q ${PYTEST_ARGS:-}
code=$?
set -e
if [ "$code" -ne 0 ]; then
  echo "check_newest: tests FAILED on the newest versions (exit $code); requirements.lock unchanged"
  exit "$code"
fi
echo "check_newest: every test passed on the newest versions"
if [ "$update" -eq 1 ]; then
  { grep '^#' requirements.lock; cat "$venv.freeze"; } > requirements.lock.tmp
  mv requirements.lock.tmp requirements.lock
  echo "requirements.lock updated; review 'git diff requirements.lock' and commit it"
fi
