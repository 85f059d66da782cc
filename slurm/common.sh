# Sourced by the stage scripts. Launches one torchrun per node with srun, traps preemption.
#
# Environment (all optional):
#   AUTOREGEMBED_HOME  project folder (default: the folder sbatch was run from)
#   CONFIG             YAML run config (default: the built-in tiny pipeline settings)
#   DS_CONFIG          DeepSpeed JSON (default: ds_configs/zero3.json)
#   GPUS_PER_NODE      processes per node (default: SLURM_GPUS_ON_NODE, else 1)
#   EXTRA_ARGS         more train.py arguments, e.g. "--set output_dir=/ckpt/run1"
#   PYTHON             interpreter (default: python3)
# Real clusters: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA to the fabric interfaces, and
# NCCL_ASYNC_ERROR_HANDLING=1 (or TORCH_NCCL_ASYNC_ERROR_HANDLING=1) so a dead rank ends the job.
set -uo pipefail
cd "${AUTOREGEMBED_HOME:-$SLURM_SUBMIT_DIR}" || exit 1
PYTHON=${PYTHON:-python3}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$first_node" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# Where the stage keeps its STOP/PREEMPTED files: ask the config (the same rules train.py uses).
stage_dir() {
  "$PYTHON" - "$1" <<'PY'
import shlex, sys, os
from autoregembed.config import load_config
args = shlex.split(os.environ.get("EXTRA_ARGS", ""))
sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
cfg = load_config(os.environ.get("CONFIG") or None, sets)
print(cfg.stage_dir(sys.argv[1]))
PY
}

# run_stage STAGE [SUBCOMMAND-STAGE]: train.py --set stage=STAGE, requeue on preemption.
run_stage() {
  local stage=$1 sdir
  sdir=$(stage_dir "$stage") || exit 1
  mkdir -p "$sdir"
  rm -f "$sdir/STOP"
  trap 'echo "[slurm] USR1: asking $stage to checkpoint and stop"; touch "$sdir/STOP"' USR1
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
    exec torchrun --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS_PER_NODE \
      --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT \
      train.py --deepspeed $DS_CONFIG ${CONFIG:+--config $CONFIG} --set stage=$stage --resume ${EXTRA_ARGS:-}" &
  local pid=$! rc
  while true; do  # wait returns early when the trap fires; keep waiting for the step itself
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ -f "$sdir/PREEMPTED" ]; then
    echo "[slurm] $stage saved step $(cat "$sdir/PREEMPTED"); requeueing job $SLURM_JOB_ID"
    rm -f "$sdir/PREEMPTED" "$sdir/STOP"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
