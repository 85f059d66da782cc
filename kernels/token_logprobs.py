"""Fused LM-head log-likelihood: log p(y_t) = h_t . w_{y_t} - logsumexp_v(h_t . w_v), no [M, V] logits.

Forward (``_fwd_kernel``): the vocabulary is split into ``S`` ranges; program (s, m) walks the
BLOCK_V tiles of range s for BLOCK_M tokens, computing each logit tile H_blk @ W_tile^T (tiled
over D) and keeping an online max, sum of exponentials and target logit.  The S partial results
per token ([S, M] each) are combined on the host.  Why split: stage-2 batches have a few hundred
to a few thousand scored tokens, i.e. 5-30 token blocks; without a V split most of 132 SMs idle.
Split index fastest in launch order, so the programs running at once share a few H blocks and
read the same W tiles from L2.

Backward (``_dz_kernel`` + one GEMM per token chunk): dH = dZ @ W with
dZ = g * (onehot(y) - softmax).  The kernel recomputes logit tiles (grouped launch order, as in
a GEMM) and writes dZ for a chunk of tokens in the input dtype; a cuBLAS GEMM then forms that
chunk of dH.  No atomics: each dH element is written once.  The dZ chunk is bounded by
``dz_budget_bytes`` (default: the size of H), so memory stays O(M x D).  The LM head is frozen:
there is no dW.

Precision: tensor-core operands stay in the input dtype (bf16/fp16) with fp32 accumulation and
fp32 softmax statistics; fp32 inputs use IEEE fp32 products (exact, but no tensor cores: train in
bf16 on GPUs).  Only under the Triton interpreter (CPU, tests) are bf16/fp16 operands upcast,
because its ``tl.dot`` does not compute bf16 products correctly.
"""
import math

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
LOG2E = tl.constexpr(1.4426950408889634)

# (BLOCK_M, BLOCK_V, BLOCK_D, num_warps, num_stages): H100 configurations that compile without
# register spills (tests/test_kernel_ptx.py checks the first of each list with ptxas).
FWD_CONFIGS = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3)]
DZ_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)]
GROUP_M = 8


def _configs(table):
    if INTERPRETED:  # one small configuration: autotuning would only multiply the interpreter's time
        return [triton.Config({"BLOCK_M": 32, "BLOCK_V": 64, "BLOCK_D": 32})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bm, bv, bd, w, s in table]


def _m_bucket(m: int) -> int:
    """Autotune key for the token count: powers of two, so varying stage-2 batches reuse a choice."""
    return 1 << max(6, min(16, math.ceil(math.log2(max(m, 1)))))


@triton.jit
def _logit_tile(H, W, rows, offs_v, mask_m, mask_v, D, stride_h, stride_w,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_V] = H[rows] @ W[offs_v]^T; ``rows``/``offs_v`` are int64."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(W + offs_v[:, None] * stride_w + offs_d[None, :], mask=mask_v[:, None], other=0.0)
        else:
            mask_d = offs_d < D
            h = tl.load(H + rows[:, None] * stride_h + offs_d[None, :],
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(W + offs_v[:, None] * stride_w + offs_d[None, :],
                        mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


@triton.autotune(configs=_configs(FWD_CONFIGS), key=["V", "D", "M_BUCKET"])
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _fwd_kernel(H, W, Y, PMAX, PSUM, PTGT, M, V, D, stride_h, stride_w, M_BUCKET,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_s = tl.program_id(0)  # vocabulary range: fastest in launch order
    pid_m = tl.program_id(1)
    n_split = tl.num_programs(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    y = tl.load(Y + rows, mask=mask_m, other=-1)
    n_tiles = tl.cdiv(V, BLOCK_V)
    per_split = tl.cdiv(n_tiles, n_split)
    t_begin = pid_s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)
    run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    target = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_v = t * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        logits = _logit_tile(H, W, rows, offs_v.to(tl.int64), mask_m, mask_v, D, stride_h, stride_w,
                             BLOCK_M, BLOCK_V, BLOCK_D, EVEN_D, UPCAST, IEEE)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        run_sum = (run_sum * tl.exp2((run_max - new_max) * LOG2E)
                   + tl.sum(tl.exp2((logits - new_max[:, None]) * LOG2E), 1))
        run_max = new_max
        target += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), 1)
    out = pid_s.to(tl.int64) * M + rows
    tl.store(PMAX + out, run_max, mask=mask_m)
    tl.store(PSUM + out, run_sum, mask=mask_m)
    tl.store(PTGT + out, target, mask=mask_m)


@triton.autotune(configs=_configs(DZ_CONFIGS), key=["V", "D", "M_BUCKET"])
@triton.heuristics({"EVEN_D": lambda a: a["D"] % a["BLOCK_D"] == 0})
@triton.jit
def _dz_kernel(H, W, Y, LSE, G, DZ, M, V, D, stride_h, stride_w, stride_dz, M_BUCKET,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN_D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, GROUP: tl.constexpr):
    # grouped order: GROUP token blocks sweep the vocabulary together, so W tiles and H blocks hit L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * n_v
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(n_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_v = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    rows = offs_m.to(tl.int64)
    cols = offs_v.to(tl.int64)
    logits = _logit_tile(H, W, rows, cols, mask_m, mask_v, D, stride_h, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_D, EVEN_D, UPCAST, IEEE)
    y = tl.load(Y + rows, mask=mask_m, other=-1)
    lse = tl.load(LSE + rows, mask=mask_m, other=0.0)
    g = tl.load(G + rows, mask=mask_m, other=0.0).to(tl.float32)
    prob = tl.exp2((logits - lse[:, None]) * LOG2E)
    dz = g[:, None] * (tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0) - prob)
    tl.store(DZ + rows[:, None] * stride_dz + cols[None, :], dz.to(DZ.dtype.element_ty),
             mask=mask_m[:, None] & mask_v[None, :])


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, label_range: bool = True):
    """Shapes, layout and label range; a label outside [0, V) would read past the head or score 0.
    The range check syncs with the GPU once; the backward skips it (the forward saw the labels)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [M, D] and weight [V, D]; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [M]; got {tuple(labels.shape)}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1 or labels.stride(0) != 1:
        raise ValueError("hidden, weight and labels must be contiguous in their last dimension")
    if label_range and labels.numel() and bool(((labels < 0) | (labels >= weight.shape[0])).any()):
        bad = labels[(labels < 0) | (labels >= weight.shape[0])][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {weight.shape[0]})")


def _flags(hidden, weight):
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    ieee = hidden.dtype == torch.float32
    return {"UPCAST": INTERPRETED and not ieee, "IEEE": ieee}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def vocab_splits(m: int, v: int, sm_count: int) -> int:
    """How many vocabulary ranges the forward uses: enough programs for two waves when M is small,
    at least 8 so concurrent programs share H blocks, never more than 64-wide tiles allow."""
    m_blocks = max(1, -(-m // 128))
    return max(1, min(-(-v // 64), max(8, -(-2 * sm_count // m_blocks))))


def token_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, splits: int | None = None):
    """Return (target logit, logsumexp), each fp32 [M].  ``splits`` overrides ``vocab_splits``
    (ranges beyond the last tile are empty and contribute nothing)."""
    check_inputs(hidden, weight, labels)
    flags = _flags(hidden, weight)
    m, d = hidden.shape
    v = weight.shape[0]
    if m == 0:
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone()
    s = splits or vocab_splits(m, v, _sm_count(hidden.device))
    pmax, psum, ptgt = torch.empty((3, s, m), dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (s, triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    _fwd_kernel[grid](hidden, weight, labels, pmax, psum, ptgt, m, v, d, hidden.stride(0), weight.stride(0),
                      _m_bucket(m), **flags)
    top = pmax.max(dim=0).values
    lse = top + torch.log((psum * torch.exp(pmax - top)).sum(dim=0))
    return ptgt.sum(dim=0), lse


def token_logprobs_bwd(hidden, weight, labels, lse, grad_out, dz_budget_bytes: int | None = None):
    """dL/dhidden for L = sum_t grad_out[t] * log p(labels[t]); same dtype as hidden.

    dz_budget_bytes bounds the dZ buffer (default: the bytes of ``hidden``, at least 32 MiB)."""
    check_inputs(hidden, weight, labels, label_range=False)
    flags = _flags(hidden, weight)
    m, d = hidden.shape
    v = weight.shape[0]
    dh = torch.empty((m, d), dtype=hidden.dtype, device=hidden.device)
    if m == 0:
        return dh
    budget = dz_budget_bytes or max(hidden.numel() * hidden.element_size(), 32 << 20)
    chunk = max(128, budget // (v * hidden.element_size()) // 128 * 128)
    chunk = min(chunk, m)
    dz = torch.empty((chunk, v), dtype=hidden.dtype, device=hidden.device)
    grad_out = grad_out.float().contiguous()
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        n = e - s
        grid = lambda meta, n=n: (triton.cdiv(n, meta["BLOCK_M"]) * triton.cdiv(v, meta["BLOCK_V"]),)  # noqa: E731
        _dz_kernel[grid](hidden[s:e], weight, labels[s:e], lse[s:e], grad_out[s:e], dz, n, v, d,
                         hidden.stride(0), weight.stride(0), dz.stride(0), _m_bucket(n), GROUP=GROUP_M, **flags)
        torch.mm(dz[:n], weight, out=dh[s:e])
    return dh
