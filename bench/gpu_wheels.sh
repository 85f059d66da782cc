#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on the GPU machine (Python 3.12, no network), into .whl/
# (or $1): what the image lacks (deepspeed and what it needs beyond the image, the two comparison
# kernels) and peft at the lock's version (the image's is unread). Transformers and huggingface-hub
# are the image's own (5.17.0 / 1.33.0, both tested): carrying newer ones drags in a newer hub and its
# own requirements. Ends with bench/check_wheels.py, which fails if any wheel would not resolve there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
rm -rf "$dest" && mkdir -p "$dest"
lock() { grep -i "^$1==" requirements.lock | head -n 1 | grep . || echo "$1"; }  # the lock's pin, else the newest
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --only-binary=:all:)
# deepspeed ships only a source archive: build its (pure-Python, ops compiled on demand) wheel here
pip wheel -q --no-deps --no-build-isolation "$(lock deepspeed)" -w "$dest"
pip download -q --no-deps "${PLAT[@]}" -d "$dest" "$(lock hjson)" "$(lock pydantic)" "$(lock pydantic-core)" \
  "$(lock annotated-types)" "$(lock typing-inspection)" "$(lock typing-extensions)" "$(lock liger-kernel)" \
  "$(lock cut-cross-entropy)" "$(lock peft)"
du -sh "$dest"
python bench/check_wheels.py "$dest"
