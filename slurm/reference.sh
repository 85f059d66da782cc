#!/usr/bin/env bash
#SBATCH --job-name=are-reference
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# AutoRegEmbed reference. Submit from the project folder: sbatch slurm/reference.sh
# On GPU nodes add e.g. --gpus-per-node=8 --cpus-per-task=... and GPUS_PER_NODE=8.
# Environment: see slurm/common.sh.
source "${AUTOREGEMBED_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_stage reference
