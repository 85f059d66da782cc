"""What the tests share besides fixtures (conftest.py holds those): the repository root and the one way
a test starts a Python child process."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_module(name: str):
    """``bench/<name>.py`` imported as a module, as ``python bench/<name>.py`` would see its folder
    (where bench/harness.py is)."""
    import importlib

    folder = os.path.join(ROOT, "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it): for rendezvous and daemons,
    so parallel or repeated runs never collide on a fixed number."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    """Environment for the multi-process tests' children: CPU and gloo even on a GPU machine (two
    ranks cannot share one GPU under NCCL; the gpu-marked tests cover CUDA), one thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": "", **extra}


def child_command(args: list, ranks: int | None = None) -> list:
    """The command line of a Python child: ``python ARGS`` (a script, ``-c CODE`` or ``-m MODULE``
    and their arguments), or with ``ranks`` the same under torch.distributed.run on a free port."""
    if ranks is None:
        return [sys.executable, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(free_port()), *map(str, args)]


def run_train(sets: list[str], *args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``python train.py --set k=v ...`` (then ``args``, e.g. ``--resume``) through ``run_child``."""
    return run_child([os.path.join(ROOT, "train.py"), *[a for kv in sets for a in ("--set", kv)], *args],
                     timeout=timeout, **kwargs)


def run_child(args: list, ranks: int | None = None, env: dict | None = None, timeout: float = 300,
              cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Every Python child of the tests starts here: ``child_command`` with ``child_env()`` (or
    ``env``), from the repository root, output captured as text."""
    return subprocess.run(child_command(args, ranks), env=child_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def patched_train(tmp_path, patch: str) -> str:
    """A train.py that first applies ``patch`` (code that breaks or watches something on purpose)."""
    script = tmp_path / "patched_train.py"
    script.write_text(f"import sys\n{patch}\n"
                      "from autoregembed.tools.cli import _add_run_args, run_training\nimport argparse\n"
                      "p = argparse.ArgumentParser()\n_add_run_args(p)\nsys.exit(run_training(p.parse_args()))\n")
    return str(script)


TINY_BASE = {}  # {"path": ...} once the default_tiny_base fixture ran, for helpers that start children


def wandb_records(path: str) -> list:
    """The protobuf records of an offline run's .wandb file (a LevelDB-style log: 32 KiB blocks of
    records with 7-byte headers, after a 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, out, buf, pos = open(path, "rb").read(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # the rest of the block is padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out
