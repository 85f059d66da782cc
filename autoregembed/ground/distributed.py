"""Process-group setup for every launcher users have: deepspeed, torchrun, mpirun, srun, or none.

torchrun and the deepspeed launcher export RANK/WORLD_SIZE/LOCAL_RANK; mpirun and srun
do not, so their variables are translated here before DeepSpeed initialises.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

_LAUNCHERS = [  # (rank, world size, local rank) variables, most specific first
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),  # MPICH / Intel MPI
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"),  # srun (set only inside a job step)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(environ=os.environ) -> dict:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables this process should use."""
    env = {}
    if "RANK" not in environ:
        for rank, size, local in _LAUNCHERS:
            if rank in environ and size in environ:
                env = {"RANK": environ[rank], "WORLD_SIZE": environ[size], "LOCAL_RANK": environ.get(local, "0")}
                break
        else:
            env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    world = int(env.get("WORLD_SIZE", environ.get("WORLD_SIZE", "1")))
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = str(_free_port() if world == 1 else 29500)
    return env


def gpus_requested_by(environ=os.environ) -> str | None:
    """The launcher variable that allocated GPUs to this process (Slurm's), or None."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(var, "").strip() not in ("", "0"):
            return var
    return None


def select_device(requested: str, environ=os.environ):
    """Apply ``device`` (auto | cuda | cpu) before anything initialises CUDA.

    A GPU job must never fall back to CPU silently (it would run for days at 1% speed): when the
    config says cuda, or Slurm allocated GPUs, and this torch sees none, stop with the reason."""
    from .errors import ConfigError

    if requested == "cpu":
        environ["CUDA_VISIBLE_DEVICES"] = ""
        return
    asked = "device=cuda" if requested == "cuda" else gpus_requested_by(environ)
    if asked and not torch.cuda.is_available():
        why = (f"torch {torch.__version__} is a CPU-only build: install the CUDA build of torch"
               if torch.version.cuda is None else "torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)")
        source = asked if asked == "device=cuda" else f"{asked}={environ[asked]}"
        raise ConfigError(f"{source} asks for GPUs but {why}; set device=cpu to run on CPU on purpose")


STALE_LOCK_S = 600  # building DeepSpeed's CPU shared-memory op takes about a minute


def clear_stale_extension_lock(name: str = "deepspeed_shm_comm", max_age_s: float = STALE_LOCK_S) -> str | None:
    """Remove ``<torch extensions>/<name>/lock`` when it is older than ``max_age_s``; returns its path if so.

    Why: torch's extension loader takes that lock on every load, and DeepSpeed loads its shared-memory
    op whenever it starts on CPU; a process killed while holding it (a job or test timeout) leaves it
    behind, and every later start waits on it forever without a word.  No build lasts ten minutes."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = os.path.join(_get_build_directory(name, False), "lock")
        if time.time() - os.path.getmtime(lock) < max_age_s:
            return None
        os.remove(lock)
    except (ImportError, OSError):  # no such lock (the usual case), or a torch without the helper
        return None
    print(f"[autoregembed] removed {lock}, a lock left by a process that died while loading DeepSpeed's "
          f"CPU communication op (every later start would have waited on it)", file=sys.stderr, flush=True)
    return lock


def init_distributed():
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU)."""
    os.environ.update(launch_env())
    if dist.is_initialized():
        return
    import deepspeed
    # Imported before the group exists: its functions take ``group=group.WORLD`` as a default argument,
    # evaluated at import, and a later import (DeepSpeed's, while an engine is built) would hold the
    # default group past destroy_process_group (shutdown), its gloo threads into the interpreter's teardown.
    import torch.distributed.nn.functional  # noqa: F401

    if not torch.cuda.is_available():
        clear_stale_extension_lock()

    if torch.cuda.is_available():
        # before the process group: NCCL binds each rank's communicator to the current device, and a
        # rank that starts on GPU 0 leaves a context there on every rank of the node
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    with contextlib.redirect_stdout(io.StringIO()):  # its one print, "... shm_comm_op built successfully", per rank
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size(environ=os.environ) -> int:
    """Processes on this node (torchrun/deepspeed, Open MPI, Slurm), else the world size."""
    for var in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return world_size()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others): what only rank 0 reads
    need not be held by every rank (an all-gather of a corpus' embeddings would hold it W times)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _all_reduce(value: float, op) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=op)
    return t.item()


def mean_across_ranks(value: float) -> float:
    return _all_reduce(value, dist.ReduceOp.SUM) / world_size()


def sum_across_ranks(values: list) -> list[float]:
    """Element-wise sums over ranks of ``values`` (floats or 0-d tensors, on any device) in one
    all-reduce, read back to the host once: the step loop's only wait for the GPU."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device()).reshape(()) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_across_ranks(flag: bool) -> bool:
    """True on every rank if it is true on any rank."""
    return _all_reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def shutdown():
    """Destroy every process group, and with them their communication threads, while the interpreter
    is alive: through ``deepspeed.comm`` once DeepSpeed made groups, since it holds its own references
    (``deepspeed.utils.groups``) that would otherwise keep gloo's threads running into the interpreter's
    teardown, where a 2-rank CPU run once aborted ("terminate called without an active exception")."""
    if not dist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None:
        ds_comm.destroy_process_group()  # also drops DeepSpeed's group references
    else:
        dist.destroy_process_group()
    gc.collect()  # the groups' last owners may sit in reference cycles (engines, optimizers)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def gathered(params: list, modifier_rank: int | None = None):
    """Full values of (possibly ZeRO-3 partitioned) parameters inside the context; with
    ``modifier_rank`` that rank's changes are broadcast and re-partitioned on exit.  Every rank
    must enter it (the gather is collective); a no-op for parameters that are not partitioned."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
    return contextlib.nullcontext()
