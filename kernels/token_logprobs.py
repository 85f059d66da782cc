"""Fused LM-head + log-softmax + target gather, forward and backward, tiled over the vocabulary.

Forward: one program per BLOCK_M tokens walks the vocabulary in BLOCK_V tiles, computing
the logit tile H_blk @ W_tile^T (itself tiled over D), and keeps an online logsumexp
and the target logit.  Nothing of size [M, V] is ever written.

Backward: one program per (BLOCK_M, BLOCK_V) tile recomputes the logit tile, forms
dz = g * (onehot(y) - softmax) from the saved logsumexp, and accumulates dz @ W_tile
into an fp32 dH with atomic adds.  The LM head is frozen: there is no dW.

All arithmetic is fp32; bf16/fp16 inputs are upcast right after loading (which is also
what the CPU interpreter needs, as numpy has no bf16).
"""
import torch
import triton
import triton.language as tl

_INTERPRETED = triton.knobs.runtime.interpret


def _configs(block_d_options):
    if _INTERPRETED:  # autotuning under the interpreter only multiplies its run time
        return [triton.Config({"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_D": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bv, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3)]
        for bd in block_d_options
    ]


@triton.jit
def _logit_tile(H, W, offs_m, offs_v, mask_m, mask_v, D, stride_h, stride_w,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(H + offs_m[:, None] * stride_h + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + offs_v[:, None] * stride_w + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if IEEE:
            acc += tl.dot(h, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(h, tl.trans(w))
    return acc


@triton.autotune(configs=_configs([64, 128]), key=["V", "D"])
@triton.jit
def _fwd_kernel(H, W, Y, TGT, LSE, M, V, D, stride_h, stride_w,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    y = tl.load(Y + offs_m, mask=mask_m, other=0)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = _logit_tile(H, W, offs_m, offs_v, mask_m, mask_v, D, stride_h, stride_w,
                             BLOCK_M, BLOCK_V, BLOCK_D, IEEE)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        run_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), 1)
    tl.store(TGT + offs_m, target, mask=mask_m)
    tl.store(LSE + offs_m, run_max + tl.log(run_sum), mask=mask_m)


@triton.autotune(configs=_configs([64, 128]), key=["V", "D"], reset_to_zero=["DH"])
@triton.jit
def _bwd_kernel(H, W, Y, LSE, G, DH, M, V, D, stride_h, stride_w, stride_dh,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    logits = _logit_tile(H, W, offs_m, offs_v, mask_m, mask_v, D, stride_h, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_D, IEEE)
    y = tl.load(Y + offs_m, mask=mask_m, other=-1)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    g = tl.load(G + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    prob = tl.where(mask_v[None, :], tl.exp(logits - lse[:, None]), 0.0)
    onehot = tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - prob)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        w = tl.load(W + offs_v[:, None] * stride_w + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if IEEE:
            dh = tl.dot(dz, w, input_precision="ieee")
        else:
            dh = tl.dot(dz, w)
        tl.atomic_add(DH + offs_m[:, None] * stride_dh + offs_d[None, :], dh,
                      mask=mask_m[:, None] & mask_d[None, :])


def _check(hidden, weight, labels):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [M, D] and weight [V, D]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [M]; got {tuple(labels.shape)}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("hidden and weight must be contiguous in their last dimension")


def _ieee(hidden, weight):
    # fp32 inputs keep fp32 products; bf16/fp16 are exact in TF32, so the fast path loses nothing.
    return hidden.dtype == torch.float32 or weight.dtype == torch.float32


def token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """Return (target logit, logsumexp), each fp32 [M]."""
    _check(hidden, weight, labels)
    m, d = hidden.shape
    v = weight.shape[0]
    target = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    if m == 0:
        return target, lse
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _fwd_kernel[grid](hidden, weight, labels, target, lse, m, v, d, hidden.stride(0), weight.stride(0),
                      IEEE=_ieee(hidden, weight))
    return target, lse


def token_logprobs_bwd(hidden, weight, labels, lse, grad_out):
    """dL/dhidden for L = sum_t grad_out[t] * log p(labels[t]); same dtype as hidden."""
    _check(hidden, weight, labels)
    m, d = hidden.shape
    v = weight.shape[0]
    dh = torch.zeros((m, d), dtype=torch.float32, device=hidden.device)
    if m == 0:
        return dh.to(hidden.dtype)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(v, meta["BLOCK_V"]))  # noqa: E731
    _bwd_kernel[grid](hidden, weight, labels, lse, grad_out, dh, m, v, d, hidden.stride(0), weight.stride(0),
                      dh.stride(0), IEEE=_ieee(hidden, weight))
    return dh.to(hidden.dtype)
