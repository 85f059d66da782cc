#!/usr/bin/env bash
#SBATCH --job-name=are-export
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# AutoRegEmbed export on GPU nodes. Submit from the project folder: sbatch slurm/export.sh
# One task per node runs torchrun with one process per allocated GPU. Change the node count, GPUs
# and CPUs per node on the command line (sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=32 ...).
# Whole nodes (--exclusive, --mem=0: all their memory); set --time to what the partition allows:
# 300 s before it the ranks save and the job requeues itself.
# Environment: see slurm/common.sh.
source "${AUTOREGEMBED_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_stage export
