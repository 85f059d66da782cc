#!/usr/bin/env bash
# Submit every stage a pipeline runs with this config (`autoregembed stages`: stage1 [mine]
# [reference] stage2 eval), each after the previous one succeeded: slurm/<stage>.sh where the stage
# has a script of its own, else slurm/stage.sh <stage>.
# Run from the project folder: bash slurm/pipeline.sh [extra sbatch options, e.g. --nodes=4]
# Prints one line per job: "<stage> <job id>". Environment: see slurm/common.sh (CONFIG and
# EXTRA_ARGS decide the stages, as they do for each job).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of train.py arguments
stages=$("${python:-python3}" -m autoregembed.tools.cli stages ${CONFIG:+--config "$CONFIG"} ${EXTRA_ARGS:-})
prev=""
for stage in $stages; do
  dep=${prev:+--dependency=afterok:$prev --kill-on-invalid-dep=yes}
  if [ -f "slurm/$stage.sh" ]; then job=("slurm/$stage.sh"); else job=(--job-name="are-$stage" slurm/stage.sh "$stage"); fi
  prev=$(sbatch --parsable $dep "$@" "${job[@]}")
  prev=${prev%%;*}
  echo "$stage $prev"
done
