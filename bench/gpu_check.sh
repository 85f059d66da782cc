#!/usr/bin/env bash
# The GPU measurements in one go, on one H100/H200 (< 8 minutes): GPU-marked tests, then
# bench/gpu_check.py, which writes bench/results/gpu.json (also copied to $OUT when set).
#
# The machine has torch, triton, transformers, peft and safetensors but no deepspeed, liger-kernel
# or cut-cross-entropy and no network: build their wheels here first with bench/gpu_wheels.sh
# (into .whl/, git-ignored) and take .whl along; they are installed into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -n 15
tests_rc=${PIPESTATUS[0]}
"$PY" bench/gpu_check.py "$@"
check_rc=$?
[ -n "${OUT:-}" ] && cp bench/results/gpu.json "$OUT/" 2>/dev/null
echo "[gpu_check] tests rc=$tests_rc, checks rc=$check_rc"
exit $(( tests_rc || check_rc ))
