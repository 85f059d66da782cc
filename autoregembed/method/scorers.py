"""LM-head scorer backends: log p(y_t | h_t) for each scored token against the frozen LM head, with its
gradient w.r.t. the hidden states, never as [tokens, vocab] logits.

A backend is one class here and one entry in ``SCORERS``; ``model.scorer`` names it and ``scorer_for``
builds it once (the model's ``LogprobHead`` holds it).  Besides the values, a backend tells the
planner what it holds between forward and backward (``held_bytes``).  Ours forms each token's
Jacobian in the forward (logprobs.py), so its backward is one scaling; cut-cross-entropy recomputes
the logits block by block in the backward, reading the LM head again.
"""
from __future__ import annotations

import dataclasses

from ..ground.errors import InputError

PLAN_SMS = 132  # H100 SXM multiprocessors: the fused scorer's chunk is sized to cover them


class Scorer:
    """A backend: ``token_logprobs(hidden [M, D], weight [V, D] frozen, labels [M]) -> fp32 [M]``."""

    name = ""

    def token_logprobs(self, hidden, weight, labels):
        from .logprobs import check_scoring_inputs

        check_scoring_inputs(hidden, weight, labels)
        return self._token_logprobs(hidden.contiguous(), weight, labels.contiguous())

    def _token_logprobs(self, hidden, weight, labels):
        raise NotImplementedError

    def held_bytes(self, tokens: int, hidden: int, vocab: int) -> int:
        """Bytes it keeps for the backward and uses while it runs, for ``tokens`` scored bf16 hidden
        states (autoregembed plan)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FusedScorer(Scorer):
    """Ours (logprobs.token_logprobs): token chunks of fp32 logits, each token's Jacobian formed in
    the forward, so the backward is one scaling and never reads the LM head.  ``row_stats``: who
    computes each chunk's softmax statistics (auto: the Triton kernel on CUDA, PyTorch elsewhere)."""

    row_stats: str = "auto"
    name = "fused"

    def _token_logprobs(self, hidden, weight, labels):
        from .logprobs import TILE_BUDGET_BYTES, TokenLogprobs

        return TokenLogprobs.apply(hidden, weight, labels, TILE_BUDGET_BYTES, self.row_stats)

    def held_bytes(self, tokens, hidden, vocab):
        from .logprobs import TILE_BUDGET_BYTES, chunk_rows

        chunk = chunk_rows(vocab, True, TILE_BUDGET_BYTES, hidden, PLAN_SMS) * vocab * 8  # fp32 logits + bf16 dZ
        return (2 * hidden + 4) * tokens + chunk  # bf16 Jacobians and fp32 log-probabilities


@dataclasses.dataclass(frozen=True)
class CutCrossEntropyScorer(Scorer):
    """Apple's cut-cross-entropy (``linear_cross_entropy(..., reduction="none")``, negated), with
    ``filter_eps=None``: its default filter skips gradient blocks whose softmax is small, which is
    exact enough for a summed loss but not for the per-sequence differences stage 2 takes.  Its
    kernels need CUDA; on CPU tensors the library's PyTorch implementation runs eagerly in fp32, one
    token chunk at a time under activation checkpointing, so it too recomputes the logits in the
    backward instead of keeping them."""

    name = "cce"

    def _token_logprobs(self, hidden, weight, labels):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            raise InputError("key 'model.scorer': 'cce' needs cut-cross-entropy (pip install cut-cross-entropy)") from None
        if hidden.is_cuda:
            return -linear_cross_entropy(hidden, weight, labels, reduction="none", filter_eps=None, impl="cce").float()
        import torch
        from torch.utils.checkpoint import checkpoint

        from .logprobs import TILE_BUDGET_BYTES, chunk_rows

        w32 = weight.float()  # fp32 logits, as its CUDA kernels accumulate (and CPU has no fast half GEMM)

        def chunk_logprobs(h, y):
            with torch.compiler.set_stance("force_eager"):  # the same maths without compiling on CPU
                return -linear_cross_entropy(h.float(), w32, y, reduction="none", impl="torch_compile")

        rows = chunk_rows(weight.shape[0], False, TILE_BUDGET_BYTES)
        parts = [checkpoint(chunk_logprobs, hidden[s:s + rows], labels[s:s + rows], use_reentrant=False)
                 for s in range(0, hidden.shape[0], rows)]
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    def held_bytes(self, tokens, hidden, vocab):
        block = 256 * 256 * 4 * PLAN_SMS  # one fp32 logit block per multiprocessor while it runs
        return (2 * hidden + 4 + 8) * tokens + block  # its saved copy of the hidden states, lse, targets


SCORERS = {  # model.scorer -> the backend it builds
    "auto": lambda: FusedScorer("auto"),
    "triton": lambda: FusedScorer("triton"),
    "torch": lambda: FusedScorer("torch"),
    "cce": CutCrossEntropyScorer,
}


def scorer_for(name: str | Scorer) -> Scorer:
    """The backend ``model.scorer`` names (a backend is returned as it is)."""
    if isinstance(name, Scorer):
        return name
    if name not in SCORERS:
        raise InputError(f"key 'model.scorer': {name!r} is not one of {', '.join(SCORERS)}")
    return SCORERS[name]()
