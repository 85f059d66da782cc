#!/usr/bin/env bash
# The GPU measurements in one go, on one H100/H200, inside one 10-minute device call with time to
# spare (< 9 minutes): the carried wheels installed (~20 s), bench/gpu_check.py (preflight, then the
# trainer's step per variant, then the scorer; it stops starting work CHECK_DEADLINE_S seconds in),
# then the GPU-marked tests. Everything it writes goes to $OUT: gpu.json (rewritten after every
# variant), gpu_tests.log, and profile.txt with --profile.
#
#   bash bench/gpu_check.sh [--smoke] [gpu_check.py flags]   # --smoke: the same code paths on CPU
#
# The image has torch, triton, transformers, peft and safetensors but no deepspeed, liger-kernel or
# cut-cross-entropy and no network: bench/gpu_wheels.sh builds the wheels here (into .whl/, git-ignored,
# checked against the image by bench/check_wheels.py); take .whl along. PYTHON: the interpreter
# (default python3); WHEELS: the wheel folder (default .whl); SITE: where they and this checkout are
# installed (default: a new temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results}
SITE=${SITE:-$(mktemp -d)}
mkdir -p "$OUT"
PYTHON=$PY bash bench/install_carried.sh "$SITE" || exit 1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c 'import torch, triton, transformers, deepspeed, autoregembed; print("python", __import__("sys").version.split()[0],
  "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "deepspeed",
  deepspeed.__version__, "autoregembed from", autoregembed.__file__)' 2>&1 | tail -n 1
# each part under its own limit: a hang in one keeps the others' results; the measurements first,
# as they are what a run on a lent machine is for
timeout "${CHECK_LIMIT_S:-360}" "$PY" bench/gpu_check.py --out "$OUT/gpu.json" --deadline-s "${CHECK_DEADLINE_S:-300}" "$@"
check_rc=$?
timeout "${TESTS_LIMIT_S:-120}" "$PY" -m pytest -q -o addopts=-ra -m gpu -p no:cacheprovider tests/test_gpu.py > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 15 "$OUT/gpu_tests.log"
echo "[gpu_check] tests rc=$tests_rc, checks rc=$check_rc"
exit $(( tests_rc || check_rc ))
