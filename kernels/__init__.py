"""Triton kernels for AutoRegEmbed's decoder scoring.

Importing this package without a CUDA device switches Triton to its interpreter
(``TRITON_INTERPRET=1``) so the same kernels run, slowly but exactly, on CPU tensors.
The switch must happen before ``@triton.jit`` runs, which is why it lives here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .logit_rows import logit_row_stats  # noqa: E402

__all__ = ["logit_row_stats"]
