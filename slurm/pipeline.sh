#!/usr/bin/env bash
# Submit stage1 -> reference -> stage2 -> export, each after the previous one succeeded.
# Run from the project folder: bash slurm/pipeline.sh [extra sbatch options, e.g. --nodes=4]
# Prints one line per job: "<stage> <job id>". Environment: see slurm/common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
prev=""
for stage in stage1 reference stage2 export; do
  dep=${prev:+--dependency=afterok:$prev --kill-on-invalid-dep=yes}
  prev=$(sbatch --parsable $dep "$@" "slurm/$stage.sh")
  prev=${prev%%;*}
  echo "$stage $prev"
done
