"""Triton kernels for AutoRegEmbed's decoder scoring.

They run compiled on CUDA tensors and, with ``TRITON_INTERPRET=1`` set before this package is
imported, in Triton's interpreter on CPU tensors (what the tests do on machines without a GPU).
"""
from .logit_rows import logit_row_stats

__all__ = ["logit_row_stats"]
