#!/usr/bin/env bash
# Install autoregembed's requirements without ever replacing an installed torch.
#
#   bash scripts/install.sh            # what the README's first commands run (requirements, then
#                                      # this checkout as an editable package)
#   bash scripts/install.sh --dry-run  # show what pip would change, change nothing
#
# - torch already installed (e.g. the CUDA build on a GPU node): kept. pip is constrained to that
#   exact version, so a requirement it does not meet fails the install instead of swapping torch.
# - no torch: the CPU build torch==2.13.0 (on this project's machines it comes from local disk;
#   plain `pip install torch` would download a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=()
[ "${1:-}" = "--dry-run" ] && DRY=(--dry-run)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if v=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  cuda=$("$PY" -c "import torch; print(torch.version.cuda or 'none')")
  echo "[install] keeping the installed torch $v (CUDA: $cuda)"
else
  v=2.13.0
  echo "[install] no torch found: installing torch==$v"
  "$PY" -m pip install "${DRY[@]}" "torch==$v"
fi
echo "torch==$v" > "$constraints"
"$PY" -m pip install "${DRY[@]}" -r requirements.txt -c "$constraints" || {
  echo "[install] failed; if pip reports a conflict with torch==$v, install a torch that the" \
       "requirements accept (see requirements.txt) the way you installed this one, then rerun" >&2
  exit 1
}
# this checkout itself, editable: kernels/ and ds_configs/ import as autoregembed.kernels and
# autoregembed.ds_configs (pyproject.toml); the requirements above are its dependencies
"$PY" -m pip install "${DRY[@]}" --no-deps --no-build-isolation -e .
