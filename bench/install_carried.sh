#!/usr/bin/env bash
# Install what a run on a GPU machine needs, with no network, from what the call carried: the wheels
# in .whl/ (made here by bench/gpu_wheels.sh) and this checkout itself, into TARGET (default
# /tmp/site). Then: export PYTHONPATH=TARGET${PYTHONPATH:+:$PYTHONPATH}
#
#   bash bench/install_carried.sh [TARGET]     # WHEELS=DIR to take the wheels from elsewhere
#
# The image's own packages (torch, triton, setuptools) are used as they are: nothing is upgraded
# but what was carried.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET=${1:-/tmp/site}
WHEELS=${WHEELS:-.whl}
pip_install() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$@"; }
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  pip_install "$WHEELS"/*.whl
fi
# the checkout, built from a copy (setuptools writes build/ and *.egg-info beside the sources, and an
# egg-info in the root would read as a second autoregembed distribution) with the image's setuptools
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -a autoregembed kernels ds_configs pyproject.toml "$src"/
pip_install --no-build-isolation "$src"
echo "[install_carried] installed into $TARGET: $(ls "$TARGET" | grep -v -c dist-info) package(s)"
