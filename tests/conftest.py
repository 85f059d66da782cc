import os

import pytest
import torch
from helpers import TINY_BASE

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # a worker's in-process torch shares the cores with the
    # other workers (oversubscribed torch processes ran 4x slower); test children run one thread each
    torch.set_num_threads(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


TIERS = ("distributed", "cluster", "gpu")  # pyproject.toml; a test with none of them is "unit"


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; a Python without xdist runs with -o addopts=-ra
def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject.toml's addopts): one worker per core, at most 4: most tests wait on a
    child process of one or two one-thread ranks, so a second worker fills the core the first leaves idle."""
    return min(CORES, 4)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device (tests/test_kernel_ptx.py checks the kernels offline)")
    for item in items:
        if not any(t in item.keywords for t in TIERS):
            item.add_marker(pytest.mark.unit)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The built-in tiny LLaMA (briefly pretrained) and its tokenizer, built once per session."""
    from autoregembed.run.config import Config
    from autoregembed.run.loading import build_tiny_base

    cfg = Config()
    out = str(tmp_path_factory.mktemp("base") / "base")
    return build_tiny_base(out, [cfg.data.stage1, cfg.data.stage2], hidden_size=32, layers=2, pretrain_steps=30)




@pytest.fixture(scope="session")
def default_tiny_base(tmp_path_factory):
    """Exactly what a run with ``model.tiny_hidden_size=32`` builds for itself, built once per session
    and given to the training children as ``model.base`` (building one in every child doubled the
    suite's time)."""
    from autoregembed.run.config import Config
    from autoregembed.run.loading import build_tiny_base

    cfg = Config()
    out = str(tmp_path_factory.mktemp("default-base") / "base")
    TINY_BASE["path"] = build_tiny_base(out, [cfg.data.stage1, cfg.data.stage2], hidden_size=32,
                                        layers=cfg.model.tiny_layers, seed=cfg.model.tiny_seed)
    return TINY_BASE["path"]


def _export(tiny_base, tmp_path_factory, **meta) -> str:
    import torch

    from autoregembed.release.export import export_encoder

    from autoregembed.release.meta import ExportMeta
    from autoregembed.run.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_base, tiny_base, 5, torch.float32, "sdpa")
    out = str(tmp_path_factory.mktemp("export") / "model")
    export_encoder(model.encoder, tok, out, ExportMeta(num_embed_tokens=5, max_text_len=64,
                                                       instruction="Retrieve semantically similar text.", **meta))
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_base, tmp_path_factory):
    """An export of the tiny base's encoder (untrained EMBED rows, seeded): what the inference
    tools (Encoder, sentence-transformers, MTEB, mining) read."""
    return _export(tiny_base, tmp_path_factory)


@pytest.fixture(scope="session")
def pooled_export(tiny_base, tmp_path_factory):
    """The same model as ``tiny_export``, its embedding the mean of e_1..e_4 only (eval.pooling)."""
    return _export(tiny_base, tmp_path_factory, pooled=[1, 2, 3, 4])
