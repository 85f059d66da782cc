"""Per-sequence log-likelihoods from decoder hidden states, without [tokens, vocab] logits.

Every decoder scoring pass in AutoRegEmbed (stage-1 loss, reference scores, stage-2
loss) needs ``sum_t log p(y_t | ...)`` for many sequences at once (1 positive + N
negatives per query).  Materialising ``log_softmax(H @ W.T)`` costs
``tokens x vocab x 4`` bytes twice (logits and their log-softmax, plus the same again
for the gradient) and is what runs out of memory first with 32k-150k vocabularies.

``sequence_logprobs`` instead computes, per scored token,
``log p(y_t) = h_t . w_{y_t} - logsumexp_v(h_t . w_v)`` with an online logsumexp over
vocabulary tiles, and in backward recomputes the logit tiles to form ``dL/dH``.
The LM-head weight is frozen in AutoRegEmbed, so no weight gradient is produced.

On CUDA the Triton kernels in ``kernels/`` are used; elsewhere an equivalent chunked
PyTorch path with bounded memory (``token_chunk x vocab_chunk`` floats at a time).
"""
from __future__ import annotations

import os

import torch

IGNORE_INDEX = -100

# Working-set bound of the PyTorch path: one [TOKEN_CHUNK, VOCAB_CHUNK] fp32 tile.
TOKEN_CHUNK = int(os.environ.get("AUTOREGEMBED_TOKEN_CHUNK", 1024))
VOCAB_CHUNK = int(os.environ.get("AUTOREGEMBED_VOCAB_CHUNK", 8192))


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (recent torch)


def _fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32.  On CUDA, bf16/fp16 operands stay half precision (tensor cores) and only
    the output is fp32; elsewhere (CPU has no fast half GEMM) they are upcast first."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if _MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b).float()  # fp32 accumulation, rounded to bf16 once: older torch only
    return a.float() @ b.float()


def _chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """Return (target logit, logsumexp) per token in fp32, one tile at a time."""
    m = hidden.shape[0]
    v = weight.shape[0]
    bad = (labels < 0) | (labels >= v)  # a negative label would index from the end without a word
    if m and bool(bad.any()):
        raise ValueError(f"label {labels[bad][0].item()} is outside the vocabulary [0, {v})")
    target = torch.empty(m, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(m, dtype=torch.float32, device=hidden.device)
    for s in range(0, m, TOKEN_CHUNK):
        h = hidden[s : s + TOKEN_CHUNK]
        y = labels[s : s + TOKEN_CHUNK]
        run_max = torch.full((h.shape[0],), -float("inf"), device=h.device)
        run_sum = torch.zeros(h.shape[0], device=h.device)
        for vs in range(0, v, VOCAB_CHUNK):
            logits = _fp32_product(h, weight[vs : vs + VOCAB_CHUNK].T)
            new_max = torch.maximum(run_max, logits.amax(dim=1))
            run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(1)
            run_max = new_max
            del logits
        lse[s : s + TOKEN_CHUNK] = run_max + torch.log(run_sum)
        target[s : s + TOKEN_CHUNK] = (h.float() * weight[y].float()).sum(1)
    return target, lse


def _chunked_backward(hidden, weight, labels, lse, grad_tok):
    """dL/dh_t = g_t * (w_{y_t} - sum_v p_v w_v), recomputing logit tiles."""
    m = hidden.shape[0]
    v = weight.shape[0]
    grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    for s in range(0, m, TOKEN_CHUNK):
        h = hidden[s : s + TOKEN_CHUNK]
        g = grad_tok[s : s + TOKEN_CHUNK].float()
        acc = g[:, None] * weight[labels[s : s + TOKEN_CHUNK]].float()
        for vs in range(0, v, VOCAB_CHUNK):
            w = weight[vs : vs + VOCAB_CHUNK]
            p = _fp32_product(h, w.T).sub_(lse[s : s + TOKEN_CHUNK, None]).exp_().mul_(g[:, None])
            acc -= _fp32_product(p.to(w.dtype) if p.is_cuda else p, w)
            del p
        grad[s : s + TOKEN_CHUNK] = acc
    return grad.to(hidden.dtype)


def _use_triton(hidden: torch.Tensor) -> bool:
    if os.environ.get("AUTOREGEMBED_FORCE_TRITON") == "1":
        return True
    return hidden.is_cuda and os.environ.get("AUTOREGEMBED_DISABLE_TRITON") != "1"


class TokenLogprobs(torch.autograd.Function):
    """log p(y_t) per token; gradient w.r.t. hidden only (the LM head is frozen)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        if _use_triton(hidden):
            from kernels import token_logprobs_fwd

            target, lse = token_logprobs_fwd(hidden, weight, labels)
        else:
            target, lse = _chunked_forward(hidden, weight, labels)
        ctx.save_for_backward(hidden, labels, lse)
        # The Parameter itself, never a tensor sharing its storage: under ZeRO-3 the gathered
        # data is released after forward and gathered again before backward (model.LogprobHead);
        # an alias (e.g. ``weight.detach()``) would keep the whole LM head resident in between.
        ctx.weight = weight
        return target - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, labels, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = ctx.weight.detach()
        if _use_triton(hidden):
            from kernels import token_logprobs_bwd

            grad = token_logprobs_bwd(hidden, w, labels, lse, grad_out.contiguous())
        else:
            grad = _chunked_backward(hidden, w, labels, lse, grad_out)
        return grad, None, None


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[t]) for each row of ``hidden`` [M, D]; returns fp32 [M]."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [M, D] and labels [M]; got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if lm_head_weight.dim() == 2 and lm_head_weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"lm_head weight {tuple(lm_head_weight.shape)} does not match hidden size {hidden.shape[1]}")
    if lm_head_weight.requires_grad:
        raise ValueError("the LM head must be frozen: the fused scorer computes no weight gradient")
    return TokenLogprobs.apply(hidden.contiguous(), lm_head_weight, labels.contiguous())


def sequence_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of each sequence's labels.

    hidden: [S, T, D] decoder hidden states (position t predicts labels[:, t]);
    labels: [S, T] with ``IGNORE_INDEX`` where nothing is scored.  Only scored positions
    reach the LM head: they are packed into one [M, D] batch (one kernel launch for
    every query x candidate) and summed back per sequence with a segment index.
    Returns fp32 [S].
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    keep = labels != IGNORE_INDEX
    segment = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
    per_token = token_logprobs(hidden[keep], lm_head_weight, labels[keep])
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    return out.index_add(0, segment, per_token)
