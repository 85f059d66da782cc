"""Padding-free passes: a right-padded batch [S, L] run as one packed sequence of its real tokens.

Each row keeps its own positions (0, 1, ... restarting per row) and attends only within itself,
so every value equals the padded pass's; no layer spends work on padding (on ragged stage-2
batches, a third to half of the tokens).  Attention gets the row boundaries as cumulative
lengths (``cu_seq_lens_q/k``, ``max_length_q/k``, Transformers' flash-attention keywords):

- ``flash_attention_2`` (flash-attn installed) reads them directly;
- ``VARLEN`` (registered here) is PyTorch's own variable-length flash kernel,
  ``torch.nn.attention.varlen``, on CUDA where flash-attn is not installed;
- ``sdpa`` / ``eager`` (CPU, the reference path) ignore them and build a block-diagonal causal
  mask from the restarting positions, which is O(T^2): correct, and only there for checking.

Padded passes through SDPA keep it off its cuDNN backend (``sdpa_without_cudnn``), here beside the
other attention-kernel choices so that inference (``Encoder``) and training make the same one.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch

VARLEN = "autoregembed_varlen"  # attn_implementation name of torch's varlen flash kernel


class Packing(NamedTuple):
    """Where a padded batch's real tokens go in the packed sequence, and its row boundaries."""

    index: torch.Tensor  # [T] flat positions (in S x L order) of the real tokens
    position_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # [S + 1] int32
    max_len: int

    @classmethod
    def of(cls, mask: torch.Tensor, total: int | None = None) -> "Packing":
        """From a right-padded attention mask [S, L], on its device.  ``total``: mask.sum() when the
        caller knows it on the host (batches.py), so nothing is read back from the device (else
        it is, once).  ``max_len`` is the padded width L, an upper bound, which is all the varlen
        kernels need it for (their grid)."""
        flat = mask.flatten().bool()
        if total is None:
            total = int(flat.sum())
        else:  # a wrong count would silently drop or repeat tokens: checked on the device
            torch._assert_async(flat.sum() == total, f"{total} tokens expected in the packed batch")
        index = torch.nonzero_static(flat, size=total)[:, 0]
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = torch.cumsum(mask.sum(1), 0)
        # right padding: a real token's position in its row is its column
        return cls(index, (index % mask.shape[1])[None], cu, mask.shape[1])

    def attention_kwargs(self) -> dict:
        return {"position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[S, L, ...] -> [1, T, ...]: the real tokens, row after row."""
        return padded.flatten(0, 1).index_select(0, self.index)[None]

    def unpack(self, packed: torch.Tensor, shape: tuple) -> torch.Tensor:
        """[1, T, ...] -> [S, L, ...] with zeros where the padding was (gradients flow back)."""
        out = packed.new_zeros((shape[0] * shape[1], *packed.shape[2:]))
        return out.index_copy(0, self.index, packed[0]).view(*shape[:2], *packed.shape[2:])


def has_varlen() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen`` (2.9 and later)."""
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


@functools.lru_cache(maxsize=4)
def _keywords(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention function (query [1, H, T, Dh], key/value [1, Hkv, T, Dh]) over a packed
    sequence, causal within each row: ``torch.nn.attention.varlen.varlen_attn`` with the row
    boundaries the model forward received.  Returns ([1, T, H, Dh], None) like Transformers' own.
    Called as the installed torch accepts it: causal through ``window_size`` (2.10+) or ``is_causal``
    (2.9), grouped K/V heads through ``enable_gqa`` (2.12+) or repeated, a non-default scale through
    ``scale`` or folded into the queries (the kernel's own is 1/sqrt(Dh))."""
    from torch.nn.attention import varlen

    if query.shape[0] != 1 or "cu_seq_lens_q" not in kwargs:
        raise ValueError(f"attn_implementation {VARLEN!r} runs packed sequences only (batch 1 with cu_seq_lens_q)")
    if dropout:
        raise ValueError(f"attn_implementation {VARLEN!r} has no dropout")
    fn = varlen.varlen_attn
    accepts = _keywords(fn)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, Dh]
    extra = {"window_size": (-1, 0)} if "window_size" in accepts else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in accepts:
            extra["enable_gqa"] = True
        else:  # query head h reads K/V head h // group, as Transformers' repeat_kv lays them out
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if scaling is not None and "scale" in accepts:
        extra["scale"] = scaling
    elif scaling is not None:
        q = q * (scaling * q.shape[-1] ** 0.5)
    out = fn(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
             kwargs["max_length_k"], **extra)
    return out[None], None


def register_varlen():
    """Make ``VARLEN`` a valid ``attn_implementation`` (idempotent); it needs no mask."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def sdpa_without_cudnn():
    """Keep PyTorch's SDPA off its cuDNN backend (flash / memory-efficient kernels instead).
    Why: cuDNN builds an execution plan for every new (batch, length) shape, and our batches change
    length every step: on an H200 that cost 12-15 ms of CPU per attention call, 60% of a
    stage-1 step (docs/experiments.md, 2026-11-26)."""
    if torch.cuda.is_available() and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
