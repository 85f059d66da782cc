"""Softmax statistics of fp32 logit rows, and optionally dZ = onehot(y) - softmax, in one kernel.

``logit_row_stats(logits [C, V] fp32, labels [C], dz [C, V] or None)`` returns (target logit,
logsumexp), fp32 [C] each, and fills ``dz`` (in its own dtype, bf16 for a bf16 model) when given.
One program per row: a first sweep keeps an online max and sum of exponentials, a second one
(only with ``dz``) writes onehot - exp(z - lse).  Memory-bound: reads the row twice, writes dZ
once; the GEMMs on either side (logits = H W^T, dH = dZ W) stay with cuBLAS.
"""
import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
LOG2E = tl.constexpr(1.4426950408889634)
BLOCK = 4096  # elements of a row per step
NUM_WARPS = 8  # 16 elements per thread and step: four 16-byte loads


@triton.jit
def _online_update(run_max, run_sum, z):
    new_max = tl.maximum(run_max, tl.max(z, 0))
    run_sum = run_sum * tl.exp2((run_max - new_max) * LOG2E) + tl.sum(tl.exp2((z - new_max) * LOG2E), 0)
    return new_max, run_sum


@triton.jit
def _rows_kernel(Z, Y, LSE, TGT, DZ, V, stride_z, stride_dz, BLOCK: tl.constexpr, GRAD: tl.constexpr):
    """Whole blocks unmasked, then one masked tail: a mask ``offs < V`` with V not a multiple of 16
    would make every load and store scalar; unmasked, rows that start 16-byte aligned (strides
    padded by the caller) stream in 16-byte instructions whatever V is."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    run_max = float("-inf")
    run_sum = 0.0
    full = V // BLOCK * BLOCK
    for v0 in range(0, full, BLOCK):
        run_max, run_sum = _online_update(run_max, run_sum, tl.load(z_row + v0 + tl.arange(0, BLOCK)))
    if full < V:
        offs = full + tl.arange(0, BLOCK)
        run_max, run_sum = _online_update(run_max, run_sum, tl.load(z_row + offs, mask=offs < V, other=float("-inf")))
    lse = run_max + tl.log(run_sum)
    y = tl.load(Y + row)
    tl.store(LSE + row, lse)
    tl.store(TGT + row, tl.load(z_row + y))
    if GRAD:
        dz_row = DZ + row * stride_dz
        for v0 in range(0, full, BLOCK):
            offs = v0 + tl.arange(0, BLOCK)
            dz = tl.where(offs == y, 1.0, 0.0) - tl.exp2((tl.load(z_row + offs) - lse) * LOG2E)
            tl.store(dz_row + offs, dz.to(DZ.dtype.element_ty))
        if full < V:
            offs = full + tl.arange(0, BLOCK)
            z = tl.load(z_row + offs, mask=offs < V, other=float("-inf"))
            dz = tl.where(offs == y, 1.0, 0.0) - tl.exp2((z - lse) * LOG2E)
            tl.store(dz_row + offs, dz.to(DZ.dtype.element_ty), mask=offs < V)


def logit_row_stats(logits: torch.Tensor, labels: torch.Tensor, dz: torch.Tensor | None = None):
    """(target logit, logsumexp) per row of fp32 ``logits``; fills ``dz`` with onehot(y) - softmax.
    Labels must lie in [0, V): the caller checks them once for all chunks.  Rows may be strided
    (``logprobs.padded_rows``): row strides that are multiples of 16 keep the loads vectorised
    for any V."""
    c, v = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or labels.shape != (c,):
        raise ValueError(f"expected fp32 logits [C, V] contiguous in V and labels [C]; got "
                         f"{logits.dtype} {tuple(logits.shape)} and {tuple(labels.shape)}")
    if dz is not None and (dz.shape != logits.shape or dz.stride(1) != 1):
        raise ValueError(f"dz must be [C, V] contiguous in V like the logits; got {tuple(dz.shape)}")
    target = torch.empty(c, dtype=torch.float32, device=logits.device)
    lse = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        out = dz if dz is not None else logits  # never written without GRAD
        _rows_kernel[(c,)](logits, labels.contiguous(), lse, target, out, v, logits.stride(0), out.stride(0),
                           BLOCK=BLOCK, GRAD=dz is not None, num_warps=NUM_WARPS)
    return target, lse
