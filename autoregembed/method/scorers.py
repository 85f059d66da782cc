"""LM-head scorer backends: log p(y_t | h_t) for each scored token against the frozen LM head, with its
gradient w.r.t. the hidden states, never as [tokens, vocab] logits.

A backend is one class here, registered under its kind (``scorer_kind``): ``scorer.kind`` names it, its
fields are ``scorer.*`` keys, and the config loader builds it once (``cfg.scorer.backend``; the model's
``LogprobHead`` holds it).  Besides the values, a backend tells the
planner what it holds between forward and backward (``held_bytes``).  Ours forms each token's
Jacobian in the forward (logprobs.py), so its backward is one scaling; cut-cross-entropy recomputes
the logits block by block in the backward, reading the LM head again.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys

from ..ground.components import registry
from ..ground.errors import ConfigError, InputError

PLAN_SMS = 132  # H100 SXM multiprocessors: the fused scorer's chunk is sized to cover them


class Scorer:
    """A backend: ``token_logprobs(hidden [M, D], weight [V, D] frozen, labels [M]) -> fp32 [M]``."""

    kind = ""  # set by scorer_kind

    def check(self, key: str):
        """Its settings, each error naming ``key.<field>`` (``key``: the config section, ``scorer``)."""

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


def _installed(module: str) -> bool:
    """Whether ``module`` would import, without importing it (cut-cross-entropy pulls in Triton)."""
    return sys.modules[module] is not None if module in sys.modules else importlib.util.find_spec(module) is not None


SCORERS: dict[str, type] = {}  # scorer.kind -> its class
scorer_kind = registry(SCORERS)


@scorer_kind("fused")
@dataclasses.dataclass(frozen=True)
class FusedScorer(Scorer):
    """Ours (logprobs.token_logprobs): token chunks of fp32 logits, each token's Jacobian formed in
    the forward, so the backward is one scaling and never reads the LM head.  ``row_stats``: who
    computes each chunk's softmax statistics (auto: the Triton kernel on CUDA, PyTorch elsewhere)."""

    row_stats: str = "auto"  # auto | triton (on CPU only under TRITON_INTERPRET=1) | torch

    def check(self, key):
        from .logprobs import ROW_STATS

        if self.row_stats not in ROW_STATS:
            raise ConfigError(f"key '{key}.row_stats': {self.row_stats!r} is not one of {', '.join(ROW_STATS)}")

    def _token_logprobs(self, hidden, weight, labels):
        from .logprobs import TILE_BUDGET_BYTES, TokenLogprobs

        return TokenLogprobs.apply(hidden, weight, labels, TILE_BUDGET_BYTES, self.row_stats)

    def held_bytes(self, tokens, hidden, vocab):
        from .logprobs import TILE_BUDGET_BYTES, chunk_rows

        chunk = chunk_rows(vocab, True, TILE_BUDGET_BYTES, hidden, PLAN_SMS) * vocab * 8  # fp32 logits + bf16 dZ
        return (2 * hidden + 4) * tokens + chunk  # bf16 Jacobians and fp32 log-probabilities


@scorer_kind("cce")
@dataclasses.dataclass(frozen=True)
class CutCrossEntropyScorer(Scorer):
    """Apple's cut-cross-entropy (``linear_cross_entropy(..., reduction="none")``, negated), with
    ``filter_eps=None``: its default filter skips gradient blocks whose softmax is small, which is
    exact enough for a summed loss but not for the per-sequence differences stage 2 takes.  Its
    kernels need CUDA; on CPU tensors the library's PyTorch implementation runs eagerly in fp32, one
    token chunk at a time under activation checkpointing, so it too recomputes the logits in the
    backward instead of keeping them."""

    def check(self, key):
        if not _installed("cut_cross_entropy"):
            raise ConfigError(f"key '{key}.kind': 'cce' needs cut-cross-entropy (pip install cut-cross-entropy)")

    def _token_logprobs(self, hidden, weight, labels):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            raise InputError("scorer 'cce' needs cut-cross-entropy (pip install cut-cross-entropy)") from None
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


def scorer_for(name: str | Scorer) -> Scorer:
    """A backend by its kind (``fused``, ``cce``) or, for the fused one, its row statistics (``auto``,
    ``triton``, ``torch``); a backend is returned as it is."""
    from .logprobs import ROW_STATS

    if isinstance(name, Scorer):
        return name
    if name in ROW_STATS:
        return FusedScorer(name)
    if name not in SCORERS:
        raise InputError(f"scorer {name!r} is not one of {', '.join([*SCORERS, *ROW_STATS])}")
    return SCORERS[name]()
