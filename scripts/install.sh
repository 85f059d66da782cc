#!/usr/bin/env bash
# Install autoregembed and its requirements, never replacing an installed torch.
#
#   bash scripts/install.sh              # the versions CI tested (requirements.lock), then this checkout
#   bash scripts/install.sh --unlocked   # the newest versions requirements.txt's ranges allow
#   bash scripts/install.sh --dry-run    # show what pip would change, change nothing (with either)
#
# - torch already installed (e.g. the CUDA build on a GPU node): kept. pip is constrained to that
#   exact version, and the lock's pins on torch and on what torch requires (triton, CUDA libraries)
#   are left out, so nothing makes pip swap torch: a requirement it cannot meet fails the install.
# - no torch: the lock's torch (2.13.0; on this project's machines the CPU build, from local disk).
#   --unlocked installs torch==2.13.0 too: plain `pip install torch` downloads a multi-GB CUDA build.
# - then the checkout itself, editable (no build isolation: nothing is downloaded to build it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOCK=requirements.lock
DRY=() locked=1
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=(--dry-run) ;;
    --unlocked) locked=0 ;;
    *) echo "usage: bash scripts/install.sh [--unlocked] [--dry-run]" >&2; exit 2 ;;
  esac
done
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
hint() {
  if [ $locked = 1 ]; then
    echo "[install] failed with the lock ($(sed -n 3p $LOCK | tr -d '#')); \`bash scripts/install.sh" \
         "--unlocked\` installs within requirements.txt's ranges instead" >&2
  else
    echo "[install] failed; if pip reports a conflict with torch, install a torch that requirements.txt" \
         "accepts the way you installed this one, then rerun" >&2
  fi
  exit 1
}
if v=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  cuda=$("$PY" -c "import torch; print(torch.version.cuda or 'none')")
  echo "[install] keeping the installed torch $v (CUDA: $cuda)"
  [ $locked = 1 ] && "$PY" scripts/lockfile.py constraints $LOCK --keep-torch > "$constraints"
  echo "torch==$v" >> "$constraints"
else
  if [ $locked = 1 ]; then
    "$PY" scripts/lockfile.py constraints $LOCK > "$constraints"
  else
    echo "torch==2.13.0" > "$constraints"
  fi
  echo "[install] no torch found: installing $(grep '^torch==' "$constraints")"
  "$PY" -m pip install "${DRY[@]}" torch -c "$constraints" || hint
fi
[ $locked = 1 ] && echo "[install] installing the tested versions from $LOCK"
"$PY" -m pip install "${DRY[@]}" -r requirements.txt -c "$constraints" || hint
# the checkout itself: kernels/ and ds_configs/ are autoregembed.kernels and autoregembed.ds_configs
"$PY" -m pip install "${DRY[@]}" --no-deps --no-build-isolation -e .
