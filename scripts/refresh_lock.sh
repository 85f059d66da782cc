#!/usr/bin/env bash
# Upstream drift, seen before users suffer it: installs the newest versions requirements.txt allows
# into a throwaway virtual environment, prints what changed against requirements.lock, and runs the
# unit tier and the default job there.
#
#   bash scripts/refresh_lock.sh           # report only (exit 1 when a newer version breaks us)
#   bash scripts/refresh_lock.sh --write   # the same, and when both pass, rewrite requirements.lock
#
# A newer release that breaks us is fixed in the code or excluded by a bound in requirements.txt;
# then this script is run again. torch stays at install.sh's 2.13.0 (its newest is a CUDA build).
set -uo pipefail
cd "$(dirname "$0")/.."
write=0
case "${1:-}" in
  "") ;;
  --write) write=1 ;;
  *) echo "usage: bash scripts/refresh_lock.sh [--write]" >&2; exit 2 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"${PYTHON:-python3}" -m venv "$work/venv" || exit 1
PY=$work/venv/bin/python
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"  # what the tests start as `python` is the venv's too
echo "[refresh_lock] installing the newest allowed versions into $work/venv"
if ! PYTHON=$PY bash scripts/install.sh --unlocked > "$work/install.log" 2>&1; then
  tail -n 20 "$work/install.log"; exit 1
fi
"$PY" scripts/lockfile.py diff requirements.lock
"$PY" scripts/lockfile.py write "$work/requirements.lock"
echo "[refresh_lock] unit tier"
"$PY" -m pytest -q -m unit -p no:cacheprovider > "$work/unit.log" 2>&1
unit=$?
tail -n 3 "$work/unit.log"
echo "[refresh_lock] default job (python train.py)"
"$PY" train.py --set output_dir="$work/runs" > "$work/job.log" 2>&1
job=$?
grep -E "STS Spearman|Error|error:" "$work/job.log" | tail -n 3
echo "[refresh_lock] unit tier rc=$unit, default job rc=$job"
if [ $unit != 0 ] || [ $job != 0 ]; then
  [ $unit != 0 ] && grep -E "^(FAILED|ERROR)" "$work/unit.log" | head -n 20
  [ $job != 0 ] && tail -n 20 "$work/job.log"
  echo "[refresh_lock] a newer version breaks us: fix the code or bound the range in requirements.txt" >&2
  exit 1
fi
if [ $write = 1 ]; then
  cp "$work/requirements.lock" requirements.lock
  echo "[refresh_lock] wrote requirements.lock"
fi
