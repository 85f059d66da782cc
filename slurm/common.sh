# Sourced by the stage scripts. Launches one torchrun per node with srun, traps preemption.
#
# Environment (all optional):
#   AUTOREGEMBED_HOME  project folder (default: the folder sbatch was run from)
#   CONFIG             YAML run config, required on GPUs (e.g. configs/llama2_7b.yaml); a CPU job
#                      (DEVICE=cpu) without one trains the built-in tiny settings
#   DS_CONFIG          DeepSpeed JSON (default: ds_configs/zero3_multinode.json on several nodes,
#                      which keeps ZeRO-3's weight gathers inside a node; ds_configs/zero3.json on one)
#   GPUS_PER_NODE      processes per node (default: the GPUs Slurm allocated, SLURM_GPUS_ON_NODE)
#   DEVICE             train.py's device: cuda when Slurm allocated GPUs, else required (cpu) --
#                      a job that got no GPUs stops here instead of training on CPU
#   EXTRA_ARGS         more train.py arguments, e.g. "--set output_dir=/ckpt/run1"
#   PYTHON             interpreter (default: the active virtual environment's, $VIRTUAL_ENV/bin/python, which
#                      sbatch passes on; else python3 on PATH); the launcher is its torch.distributed.run,
#                      never a torchrun from PATH that may belong to another environment
#   TRITON_CACHE_DIR   default: node-local ${TMPDIR:-/tmp}/triton-$USER (a shared home is slow and
#                      is written by every rank of every node at once)
#   HF_HUB_OFFLINE     default 1: compute nodes read models from the local cache or a folder and
#                      fail at once instead of waiting on the network; set 0 to allow downloads
# Stops: the batch shell's USR1 (--signal=B:USR1@300, the time limit) and a SIGTERM to the job's steps
# (scancel --signal=TERM, --signal=TERM@N) both make the ranks save within 5 optimizer steps and the
# job requeue: the ranks handle SIGTERM themselves and torchrun ignores it (else it would kill them
# 30 s later, mid-save). Preemption: srun answers a SIGTERM of its own with SIGKILL to every rank, so
# the cluster must send the job's signal instead, SlurmctldParameters=preempt_send_user_signal, with a
# partition GraceTime longer than one step plus one checkpoint.
# NCCL: TORCH_NCCL_ASYNC_ERROR_HANDLING=1 is exported (a dead rank ends the job instead of hanging
# it). Fabric settings are cluster-specific and left to you: NCCL_SOCKET_IFNAME (e.g. the
# InfiniBand/Ethernet interface for bootstrap), NCCL_IB_HCA (e.g. mlx5), NCCL_DEBUG=INFO to
# diagnose. A CPU test cluster overrides the GPU request on the command line:
#   GPUS_PER_NODE=1 DEVICE=cpu sbatch --gpus-per-node=0 --cpus-per-task=1 slurm/stage1.sh
set -uo pipefail
cd "${AUTOREGEMBED_HOME:-$SLURM_SUBMIT_DIR}" || exit 1
PYTHON=${PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
PYTHON=${PYTHON:-python3}
if [ "${SLURM_NNODES:-1}" -gt 1 ]; then
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_multinode.json}
else
  DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
fi
if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ "${SLURM_GPUS_ON_NODE}" != 0 ]; then
  GPUS_PER_NODE=${GPUS_PER_NODE:-$SLURM_GPUS_ON_NODE}
  DEVICE=${DEVICE:-cuda}
fi
if [ -z "${GPUS_PER_NODE:-}" ] || [ -z "${DEVICE:-}" ]; then
  echo "[slurm] no GPUs allocated to this job (SLURM_GPUS_ON_NODE is unset): submit with" \
       "--gpus-per-node=N, or set GPUS_PER_NODE and DEVICE=cpu to run CPU processes on purpose" >&2
  exit 2
fi
if [ -z "${CONFIG:-}" ] && [ "$DEVICE" != cpu ]; then
  echo "[slurm] CONFIG is not set: set CONFIG=configs/llama2_7b.yaml (or your own YAML); without one the job" \
       "would train the built-in tiny test settings on $GPUS_PER_NODE GPUs per node" >&2
  exit 2
fi
# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05); torchrun would set 1 thread
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / GPUS_PER_NODE > 0 ? CPUS_PER_TASK / GPUS_PER_NODE : 1 ))}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton-${USER:-$(id -u)}}
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_ADDR=$(scontrol show node "$first_node" -o | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# Where the stage keeps its STOP/PREEMPTED files: ask the config (the same rules train.py uses).
stage_dir() {
  "$PYTHON" - "$1" <<'PY'
import shlex, sys, os
from autoregembed.run.config import load_config
args = shlex.split(os.environ.get("EXTRA_ARGS", ""))
sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
cfg = load_config(os.environ.get("CONFIG") or None, sets)
print(cfg.layout.stage_dir(sys.argv[1]))
PY
}

# run_stage STAGE [SUBCOMMAND-STAGE]: train.py --set stage=STAGE, requeue on preemption.
run_stage() {
  local stage=$1 sdir
  sdir=$(stage_dir "$stage") || exit 1
  mkdir -p "$sdir"
  rm -f "$sdir/STOP"
  trap 'echo "[slurm] USR1: asking $stage to checkpoint and stop"; touch "$sdir/STOP"' USR1
  trap 'echo "[slurm] TERM: asking $stage to checkpoint and stop"; touch "$sdir/STOP"' TERM
  srun --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 bash -c "
    trap '' TERM
    TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT exec $PYTHON -m torch.distributed.run \
      --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS_PER_NODE \
      --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT \
      train.py --deepspeed $DS_CONFIG ${CONFIG:+--config $CONFIG} --set stage=$stage --set device=$DEVICE \
      --resume ${EXTRA_ARGS:-}" &
  local pid=$! rc
  while true; do  # wait returns early when the trap fires; keep waiting for the step itself
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  # a stopped rank exits 75 (stopped, resumable) after rank 0 wrote the marker; torchrun reports that as a failure
  if [ -f "$sdir/PREEMPTED" ]; then
    echo "[slurm] $stage saved step $(cat "$sdir/PREEMPTED"); requeueing job $SLURM_JOB_ID"
    rm -f "$sdir/PREEMPTED" "$sdir/STOP"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
