import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """The built-in tiny LLaMA (briefly pretrained) and its tokenizer, built once per session."""
    from autoregembed.config import Config
    from autoregembed.loading import build_tiny_base

    cfg = Config()
    out = str(tmp_path_factory.mktemp("base") / "base")
    return build_tiny_base(out, [cfg.data.stage1, cfg.data.stage2], hidden_size=32, layers=2, pretrain_steps=30)
