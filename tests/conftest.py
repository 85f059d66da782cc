import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TIERS = ("distributed", "cluster", "gpu")  # pyproject.toml; a test with none of them is "unit"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (tests/test_kernel_ptx.py checks the kernels offline)")
    for item in items:
        if not any(t in item.keywords for t in TIERS):
            item.add_marker(pytest.mark.unit)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


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


def run_child(args: list, ranks: int | None = None, env: dict | None = None, timeout: float = 300,
              cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Every Python child of the tests starts here: ``child_command`` with ``child_env()`` (or
    ``env``), from the repository root, output captured as text."""
    return subprocess.run(child_command(args, ranks), env=child_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The built-in tiny LLaMA (briefly pretrained) and its tokenizer, built once per session."""
    from autoregembed.config import Config
    from autoregembed.loading import build_tiny_base

    cfg = Config()
    out = str(tmp_path_factory.mktemp("base") / "base")
    return build_tiny_base(out, [cfg.data.stage1, cfg.data.stage2], hidden_size=32, layers=2, pretrain_steps=30)


TINY_BASE = {}  # {"path": ...} once the default_tiny_base fixture ran, for helpers that start children


@pytest.fixture(scope="session")
def default_tiny_base(tmp_path_factory):
    """Exactly what a run with ``model.tiny_hidden_size=32`` builds for itself, built once per session
    and given to the training children as ``model.base`` (building one in every child doubled the
    suite's time)."""
    from autoregembed.config import Config
    from autoregembed.loading import build_tiny_base

    cfg = Config()
    out = str(tmp_path_factory.mktemp("default-base") / "base")
    TINY_BASE["path"] = build_tiny_base(out, [cfg.data.stage1, cfg.data.stage2], hidden_size=32,
                                        layers=cfg.model.tiny_layers, seed=cfg.seed)
    return TINY_BASE["path"]


@pytest.fixture(scope="session")
def tiny_export(tiny_base, tmp_path_factory):
    """An export of the tiny base's encoder (untrained EMBED rows, seeded): what the inference
    tools (Encoder, sentence-transformers, MTEB, mining) read."""
    import torch

    from autoregembed.export import ExportMeta, export_encoder
    from autoregembed.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_base, tiny_base, 5, torch.float32, "sdpa")
    out = str(tmp_path_factory.mktemp("export") / "model")
    export_encoder(model.encoder, tok, out, ExportMeta(num_embed_tokens=5, max_text_len=64,
                                                       instruction="Retrieve semantically similar text."))
    return out


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
