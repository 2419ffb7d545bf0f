#!/usr/bin/env bash
# The GPU checks in one call (benchmarks/gpu_check.py says what they are). On a lent GPU machine:
#   bash benchmarks/gpu_check.sh                 # all parts, results in benchmarks/results/gpu_*.json
#   bash benchmarks/gpu_check.sh --parts fp8     # one part
# Before it, on the CPU machine, fetch the wheels the GPU machine lacks into .whl/ (git-ignored) and
# carry .whl with the run:
#   .venv/bin/python benchmarks/gpu_check.py --carry-list | sh
# Here (CPU): bash benchmarks/gpu_check.sh --dry-run   (toy sizes, results in a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  # Wheels for other Pythons (xxhash and multiprocess are fetched for several) fail pip's tag check.
  mkdir -p "$SITE"
  for wheel in "$WHEELS"/*.whl; do
    "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$wheel" 2>/dev/null \
      || echo "[gpu_check] $(basename "$wheel"): not installable here (another Python's wheel)"
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
