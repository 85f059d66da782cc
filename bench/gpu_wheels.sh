#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh needs on the GPU machine (Python 3.12, no network), into .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
pip_version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --only-binary=:all:)
# deepspeed ships only a source archive: build its (pure-Python, ops compiled on demand) wheel here
pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w .whl
# what deepspeed needs that the GPU image lacks, the two comparison kernels, and the transformers and
# peft this project is tested with (the image's are older)
pip download -q --no-deps "${PLAT[@]}" -d .whl hjson pydantic pydantic-core annotated-types typing-inspection \
  typing-extensions liger-kernel cut-cross-entropy \
  "transformers==$(pip_version transformers)" "peft==$(pip_version peft)"
ls -la .whl; du -sh .whl
