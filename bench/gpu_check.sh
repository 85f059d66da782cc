#!/usr/bin/env bash
# The GPU measurements in one go, on one H100/H200 (< 8 minutes): bench/gpu_check.py, which
# writes bench/results/gpu.json (also copied to $OUT), then the GPU-marked tests (log in $OUT/gpu_tests.log).
#
# The machine has torch, triton, transformers, peft and safetensors but no deepspeed, liger-kernel
# or cut-cross-entropy and no network: build their wheels here first with bench/gpu_wheels.sh
# (into .whl/, git-ignored) and take .whl along. bench/install_carried.sh installs them and this
# checkout into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYTHON=$PY bash bench/install_carried.sh /tmp/site || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONWARNINGS=ignore
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, triton, transformers, deepspeed; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)' 2>&1 | tail -n 1
# each step under its own limit: a hang in one leaves the others' results (gpu.json is rewritten per
# section); the measurements first, as they are what a run on a lent machine is for
timeout "${CHECK_LIMIT_S:-330}" "$PY" bench/gpu_check.py "$@"
check_rc=$?
cp bench/results/gpu.json "$OUT/" 2>/dev/null
timeout "${TESTS_LIMIT_S:-150}" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$OUT/gpu_tests.log"
echo "[gpu_check] tests rc=$tests_rc, checks rc=$check_rc"
exit $(( tests_rc || check_rc ))
