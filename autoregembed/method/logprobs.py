"""Per-sequence log-likelihoods from decoder hidden states, without [tokens, vocab] logits.

Every decoder scoring pass in AutoRegEmbed (stage-1 loss, reference scores, stage-2
loss) needs ``sum_t log p(y_t | ...)`` for many sequences at once (1 positive + N
negatives per query).  Materialising ``log_softmax(H @ W.T)`` for all of them costs
``tokens x vocab x 4`` bytes several times over and is what runs out of memory first with
32k-150k vocabularies.

``token_logprobs`` works on chunks of tokens whose fp32 logits fit ``tile_budget_bytes``:
per chunk one GEMM gives the logits, ``row_stats`` their logsumexp and target logit, and,
when the hidden states need a gradient, dZ = onehot(y) - softmax, so that a second GEMM gives
each token's Jacobian ``J_t = d log p(y_t) / d h_t = dZ_t @ W`` already in the forward.
Why: ``J_t`` does not depend on the upstream gradient, so the backward is ``g_t * J_t``, two
GEMMs in all instead of three (no recomputed logits), and the LM head is not needed again
after the forward (under ZeRO-3 nothing holds it).  ``J`` is [M, D], the size of the hidden
states it replaces in the saved tensors.  The LM head is frozen: there is no weight gradient.

On CUDA the row statistics are a Triton kernel (``autoregembed.kernels.logit_rows``) and the GEMMs keep
bf16/fp16 operands with fp32 logits; elsewhere the same steps run as PyTorch operations
(``scorer`` chooses, ``scorer.row_stats`` in the config).
"""
from __future__ import annotations

import functools

import torch

from ..ground.errors import InputError

IGNORE_INDEX = -100

TILE_BUDGET_BYTES = 256 << 20  # fp32 logits (+ dZ) of one token chunk


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (recent torch)


ROW_ALIGN = 16  # elements: rows of the logits and dZ start at multiples of this (16-byte vector access)


def padded_rows(rows: int, v: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised [rows, v] tensor whose row stride is v rounded up to ``ROW_ALIGN``: with an
    odd vocabulary (GPT-2's 50257) contiguous rows would start misaligned and the row kernel
    could only use scalar loads.  Contiguous when v is already a multiple."""
    width = -(-v // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(rows, width, dtype=dtype, device=device)[:, :v]


def _fp32_product(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in fp32 (into ``out`` when given, which may have padded rows).  On CUDA, bf16/fp16
    operands stay half precision (tensor cores) and only the output is fp32; elsewhere (CPU has no
    fast half GEMM) they are upcast first."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if not _MM_OUT_DTYPE:
            product = torch.mm(a, b).float()  # fp32 accumulation, rounded to bf16 once: older torch only
        elif out is not None and _strided_out_dtype_works(a.device):
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        else:
            product = torch.mm(a, b, out_dtype=torch.float32)
        return product if out is None else out.copy_(product)
    if out is None:
        return a.float() @ b.float()
    return torch.mm(a.float(), b.float(), out=out)


@functools.cache
def _strided_out_dtype_works(device: torch.device) -> bool:
    """Whether this torch writes a half x half -> fp32 GEMM straight into padded rows (cuBLAS's ldc);
    else the scorer copies (one more pass over the logits, still cheaper than scalar row loads)."""
    a = torch.ones(3, 5, dtype=torch.bfloat16, device=device)
    out = padded_rows(3, 7, torch.float32, device)
    try:
        got = torch.mm(a, a.new_ones(5, 7), out_dtype=torch.float32, out=out)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return got.data_ptr() == out.data_ptr() and bool((out == 5).all())


def torch_row_stats(logits: torch.Tensor, labels: torch.Tensor, dz: torch.Tensor | None = None):
    """(target logit, logsumexp) of fp32 logit rows; fills ``dz`` with onehot(labels) - softmax.
    Overwrites ``logits`` when ``dz`` is given (they are not needed afterwards)."""
    lse = torch.logsumexp(logits, 1)
    target = logits.gather(1, labels[:, None])[:, 0]
    if dz is not None:
        prob = logits.sub_(lse[:, None]).exp_()
        dz.copy_(prob.neg_())
        dz[torch.arange(labels.shape[0], device=labels.device), labels] += 1
    return target, lse


ROW_STATS = ("auto", "triton", "torch")  # the fused scorer's choices (scorers.FusedScorer)


def row_stats_for(scorer: str, device: torch.device):
    """The row-statistics function of ``scorer`` (``scorer.row_stats``): auto is the Triton kernel on
    CUDA and PyTorch elsewhere; triton on CPU tensors needs Triton's interpreter."""
    if scorer not in ROW_STATS:
        raise InputError(f"scorer {scorer!r} is not one of {ROW_STATS}")
    if scorer == "torch" or (scorer == "auto" and device.type != "cuda"):
        return torch_row_stats
    from ..kernels.logit_rows import INTERPRETED, logit_row_stats

    if device.type != "cuda" and not INTERPRETED:
        raise InputError("scorer 'triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before starting Python")
    return logit_row_stats


GEMM_TILE = 128  # rows and columns of one output tile of a tensor-core GEMM


def chunk_rows(v: int, jacobian: bool, budget: int, d: int = 0, sms: int = 0) -> int:
    """Tokens per chunk: fp32 logits (+ a dZ tile of 4 bytes at most) within ``budget``; a
    multiple of 64 when more than 64 fit (GEMM tile size), at least one token.

    With ``sms`` (the GPU's multiprocessor count) and the hidden size ``d``, a chunk that needs
    the Jacobian also holds enough rows for its second GEMM, dZ [rows, V] @ W [V, d], to give
    every multiprocessor an output tile: that GEMM's output is only rows x d, and at V=128k the
    byte budget alone leaves 256 rows, 64 tiles of 128 x 128 for 132 SMs.  The budget then
    grows to what those rows need."""
    rows = budget // (v * (8 if jacobian else 4))
    rows = max(1, rows // 64 * 64 if rows >= 64 else rows)
    if jacobian and sms and d:
        tiles_per_block = max(1, d // GEMM_TILE)  # output tiles of GEMM_TILE rows
        rows = max(rows, -(-sms // tiles_per_block) * GEMM_TILE)
    return rows


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def score_tokens(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, jacobian: bool,
                 tile_budget_bytes: int = TILE_BUDGET_BYTES, scorer: str = "auto"):
    """Return (log p(labels) fp32 [M], J [M, D] in hidden's dtype or None): the forward of
    ``token_logprobs``, chunk by chunk."""
    row_stats = row_stats_for(scorer, hidden.device)
    m, v = hidden.shape[0], weight.shape[0]
    logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
    jac = torch.empty_like(hidden) if jacobian else None
    half_gemm = hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and weight.dtype == hidden.dtype
    chunk = chunk_rows(v, jacobian, tile_budget_bytes, hidden.shape[1], _multiprocessors(hidden.device))
    odd = v % ROW_ALIGN != 0  # rows padded to aligned strides; aligned vocabularies take plain tensors
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        logits = _fp32_product(hidden[s:e], weight.T,
                               padded_rows(e - s, v, torch.float32, hidden.device) if odd else None)
        dz_dtype = hidden.dtype if half_gemm else torch.float32
        dz = (padded_rows(e - s, v, dz_dtype, hidden.device) if odd else
              torch.empty(logits.shape, dtype=dz_dtype, device=hidden.device)) if jacobian else None
        target, lse = row_stats(logits, labels[s:e], dz)
        del logits
        logp[s:e] = target - lse
        if jacobian:
            if half_gemm:
                torch.mm(dz, weight, out=jac[s:e])
            else:
                jac[s:e] = dz @ weight.float()
    return logp, jac


class TokenLogprobs(torch.autograd.Function):
    """log p(y_t) per token; gradient w.r.t. hidden only (the LM head is frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, tile_budget_bytes, scorer):
        logp, jac = score_tokens(hidden, weight, labels, ctx.needs_input_grad[0], tile_budget_bytes, scorer)
        ctx.save_for_backward(jac)  # None when no gradient is needed
        return logp

    @staticmethod
    def backward(ctx, grad_out):
        """g_t * J_t, scaled in place in J's dtype: an fp32 product would be a second [M, D]
        tensor twice J's size in bf16 (256 MiB at M=16k, D=4096).  J is not needed afterwards;
        a second backward through the same graph (retain_graph) is refused by autograd's
        version check, never silently wrong."""
        (jac,) = ctx.saved_tensors
        return jac.mul_(grad_out.to(jac.dtype)[:, None]), None, None, None, None


def check_scoring_inputs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor):
    """What every scorer backend (scorers.py) requires: hidden [M, D], labels [M] inside the
    vocabulary (a negative label would index from the end without a word; on CUDA checked on the
    device, without waiting for it), a frozen LM head of hidden's width (no weight gradient)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [M, D] and labels [M]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if lm_head_weight.dim() == 2 and lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head weight {tuple(lm_head_weight.shape)} does not match hidden size {hidden.shape[1]}")
    if lm_head_weight.requires_grad:
        raise ValueError("the LM head must be frozen: the scorers compute no weight gradient")
    v = lm_head_weight.shape[0]
    bad = (labels < 0) | (labels >= v)
    if labels.numel() and labels.is_cuda:
        torch._assert_async(~bad.any(), f"a label is outside the vocabulary [0, {v})")
    elif labels.numel() and bool(bad.any()):
        raise ValueError(f"label {labels[bad][0].item()} is outside the vocabulary [0, {v})")


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   tile_budget_bytes: int = TILE_BUDGET_BYTES, scorer: str = "auto") -> torch.Tensor:
    """log p(labels[t]) for each row of ``hidden`` [M, D]; returns fp32 [M].  ``scorer``: see
    ``row_stats_for``."""
    check_scoring_inputs(hidden, lm_head_weight, labels)
    return TokenLogprobs.apply(hidden.contiguous(), lm_head_weight, labels.contiguous(), tile_budget_bytes, scorer)


def sequence_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, scorer,
                      n_scored: int | None = None) -> torch.Tensor:
    """Summed log-likelihood of each sequence's labels.

    hidden: [S, T, D] decoder hidden states (position t predicts labels[:, t]);
    labels: [S, T] with ``IGNORE_INDEX`` where nothing is scored.  Only scored positions
    reach the LM head: they are packed into one [M, D] batch (one kernel launch for
    every query x candidate) and summed back per sequence with a segment index.
    n_scored: M, when the caller knows it on the host (batches.py); the packing then never
    waits for the device (a boolean mask's size is only known after a read-back), and a wrong
    count fails the device-side check.  scorer: a backend (scorers.py ``scorer_for``: this module is
    below the registry of backends and never imports it).  Returns fp32 [S].
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    keep = (labels != IGNORE_INDEX).flatten()
    if n_scored is None:
        flat = keep.nonzero()[:, 0]
    else:
        torch._assert_async(keep.sum() == n_scored, f"{n_scored} scored tokens expected")
        flat = torch.nonzero_static(keep, size=n_scored)[:, 0]
    per_token = scorer.token_logprobs(hidden.flatten(0, 1).index_select(0, flat), lm_head_weight,
                                      labels.flatten().index_select(0, flat))
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    return out.index_add(0, flat // labels.shape[1], per_token)
