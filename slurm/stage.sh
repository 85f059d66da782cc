#!/usr/bin/env bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Any stage by name, for those without a script of their own: sbatch slurm/stage.sh mine
# (`autoregembed stages --all` lists them). One GPU by default: mine and eval run on one rank;
# ask for more on the command line for a stage that uses them. Not a whole node, so it asks for its
# memory: 128G holds a 7B model read in bf16 (13.5 GB, twice while it loads) beside mine's corpus
# embeddings (1M x 4096 fp32: 16 GB); sbatch --mem=... for other sizes.
# Environment: see slurm/common.sh.
source "${AUTOREGEMBED_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
run_stage "${1:?usage: sbatch slurm/stage.sh STAGE}"
