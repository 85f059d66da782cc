#!/usr/bin/env bash
# A CPU stand-in for the GPU machines' image, for the dry run of bench/gpu_check.sh
# (tests/test_gpu_check.py): a Python 3.12 venv holding the image's versions of what our code imports
# (the pins of bench/gpu_image.txt: torch 2.11.0, triton 3.6.0, transformers 5.17.0, huggingface-hub
# 1.33.0, ...; PyPI's torch 2.11.0 is a CUDA build, which runs on the CPU) and the wheels a GPU run
# carries (bench/gpu_wheels.sh, checked against the image by bench/check_wheels.py).
#
#   bash scripts/setup_gpu_image.sh     # what .ci/run and the README's test command run
#
# Into ${AUTOREGEMBED_GPU_IMAGE:-~/.cache/autoregembed/gpu-image}: venv/ (about 5 GB, downloaded once)
# and wheels/ (rebuilt every time: they follow requirements.lock). Where no Python 3.12 or no package
# index is at hand it says so and succeeds: the dry-run test then skips and names this script
# (AUTOREGEMBED_SKIP_GPU_IMAGE=1 skips it on purpose).
set -uo pipefail
cd "$(dirname "$0")/.."
home=${AUTOREGEMBED_GPU_IMAGE:-$HOME/.cache/autoregembed/gpu-image}
if [ "${AUTOREGEMBED_SKIP_GPU_IMAGE:-0}" = 1 ]; then
  echo "[setup_gpu_image] AUTOREGEMBED_SKIP_GPU_IMAGE=1: the GPU-image dry run will skip"
  exit 0
fi
py312=
for candidate in $(command -v python3.12) $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null); do
  "$candidate" -c 'import venv' 2>/dev/null && { py312=$candidate; break; }  # a pyenv shim may not run
done
if [ -z "$py312" ]; then
  echo "[setup_gpu_image] no Python 3.12 here: the GPU-image dry run will skip" >&2
  exit 0
fi
# the image's pins of what our code and the carried wheels import, and the unpinned rest they need
pins=$(grep -E '^(torch|triton|transformers|huggingface-hub|tokenizers|safetensors|sentence-transformers|accelerate)==' \
       bench/gpu_image.txt)
rest="numpy<=2.5.2 scipy pyyaml tqdm matplotlib psutil ninja py-cpuinfo msgpack einops nvidia-ml-py packaging pytest"
stamp="$home/venv/.pins"
if [ "$(cat "$stamp" 2>/dev/null)" != "$pins $rest" ]; then
  echo "[setup_gpu_image] building $home/venv with: $(echo $pins)"
  rm -rf "$home/venv" && mkdir -p "$home" && "$py312" -m venv "$home/venv" &&
    timeout 1800 "$home/venv/bin/pip" install -q $pins $rest || {
      echo "[setup_gpu_image] installing the image's versions failed: the GPU-image dry run will skip" >&2
      rm -rf "$home/venv"
      exit 0
    }
  echo "$pins $rest" > "$stamp"
fi
bash bench/gpu_wheels.sh "$home/wheels" > "$home/wheels.log" 2>&1 || {
  tail -n 20 "$home/wheels.log" >&2
  echo "[setup_gpu_image] the carried wheels failed to build or to resolve against the image (above)" >&2
  exit 1
}
tail -n 1 "$home/wheels.log"
echo "[setup_gpu_image] ready: $home"
