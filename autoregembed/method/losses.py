"""AutoRegEmbed training objectives on per-sequence log-likelihoods, and the contrastive baseline.

Each objective is a component: a frozen dataclass of its settings, built once by the config loader
and called on the model's result and the batch.  Stage 1's is chosen by ``stage1_loss.kind``
(``@stage1_objective``), stage 2's by ``loss.kind``; a new stage-2 variant is one class here registered
with ``@stage2_objective("<kind>")``: its fields become the ``loss.<field>`` keys of that kind
(strictly checked, like every key), its ``check`` validates them, its ``batch`` builds the micro-batch
it reads (batches.py; a new model quantity is a batch type there and its forward in model.py) and
``needs_references`` says whether that batch carries stage-1 reference values.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..ground.components import registry
from ..ground.errors import ConfigError, finite
from .batches import alignment_batch, compression_batch, contrast_batch


def compression_loss(seq_logprobs: torch.Tensor, num_target_tokens: torch.Tensor) -> torch.Tensor:
    """Stage 1: token-mean cross-entropy of the targets given their compressed tokens."""
    return -seq_logprobs.sum() / num_target_tokens.clamp(min=1)


def alignment_loss(c_q, c_p, r, owner, ref_c, ref_r, beta: float = 0.1, tau: float = 0.1,
                   reference_sign: str = "paper", detach_positive: bool = False) -> torch.Tensor:
    """Stage 2, conditional distribution alignment.

    c_q [B] = log p(pos|e_q), c_p [B] = log p(pos|e_pos), r [N] = log p(neg_i|e_q) for every
    negative of every query, owner [N] = the query each negative belongs to, ref_c [B] and
    ref_r [N] the stage-1 reference values of c_q and r.

        s1 = sigmoid(beta * |c_q - c_p|)
        s2 = sigmoid(beta * ((c_q - r_i) -/+ (ref_c - ref_r_i)))
        loss = softplus((s1 - s2) / tau)

    ``reference_sign="paper"`` subtracts the reference margin (the paper's figure, as in
    DPO); ``"code"`` adds it (the authors' released code).  Queries may have different
    numbers of negatives: the loss is the mean over each query's negatives, then over queries.

    ``detach_positive=True`` makes c_p a target: no gradient reaches the positive's own
    encoding.  Why: s1 is smallest (0.5) when c_q == c_p, and one way there is for every text to
    get the same compressed tokens.  As published the gradient lowers c_p towards c_q, which
    is that way when stage 1 reconstructs poorly (c_p not far above c_q, s1 not saturated;
    docs/experiments.md).  Off by default: the paper back-propagates through both.
    """
    if reference_sign not in ("paper", "code"):
        raise ValueError(f"reference_sign must be 'paper' or 'code', got {reference_sign!r}")
    if not (c_q.shape == c_p.shape == ref_c.shape) or not (r.shape == owner.shape == ref_r.shape):
        raise ValueError("c_q/c_p/ref_c and r/owner/ref_r must have matching shapes")
    if detach_positive:
        c_p = c_p.detach()
    s1 = torch.sigmoid(beta * (c_q - c_p).abs())[owner]
    ref_margin = ref_c[owner] - ref_r
    margin = (c_q[owner] - r) + (ref_margin if reference_sign == "code" else -ref_margin)
    s2 = torch.sigmoid(beta * margin)
    per_pair = F.softplus((s1 - s2) / tau)
    counts = torch.zeros_like(c_q).index_add(0, owner, torch.ones_like(r))
    if (counts == 0).any():
        raise ValueError("every query needs at least one negative")
    per_query = torch.zeros_like(c_q).index_add(0, owner, per_pair) / counts
    return per_query.mean()


def compression_contrast(logp: torch.Tensor, logp_other: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """mean_i softplus(-(log p(t_i | e_i) - log p(t_i | e_other)) / tokens_i): low when each text's
    compressed tokens fit it better, per token, than another text's do. Why: the reconstruction loss
    alone is mostly lowered by a prefix every text shares (diagnostics.py), which this does not reward."""
    tokens = target_mask.sum(dim=1).clamp(min=1)
    return F.softplus(-(logp - logp_other) / tokens).mean()


STAGE1_OBJECTIVES: dict[str, type] = {}  # stage1_loss.kind -> its class
# Register a stage-1 objective under ``stage1_loss.kind: <kind>``.  It has ``check(key)``,
# ``min_micro_batch_size`` (rows a micro-batch needs), ``batch(rows, text_encoder)`` and is called as
# ``objective(model(batch), batch) -> scalar loss``.
stage1_objective = registry(STAGE1_OBJECTIVES)


@stage1_objective("compression")
@dataclasses.dataclass(frozen=True)
class CompressionLoss:
    """Stage 1 on a ``model.Reconstruction``: ``compression_loss``, plus ``contrast`` times
    ``compression_contrast`` when ``contrast`` > 0 (one more decoder pass: each target also scored with
    the previous row's compressed tokens; 0: the authors' loss)."""

    contrast: float = 0.0  # the run's default is the config's (StageOneLossConfig: 4, measured best)

    def __post_init__(self):
        self.check("stage1_loss")

    @property
    def min_micro_batch_size(self) -> int:
        return 2 if self.contrast > 0 else 1  # the contrast reads another row of the micro-batch

    def check(self, key: str):
        if not (finite(self.contrast) and self.contrast >= 0):
            raise ConfigError(f"key '{key}.contrast' must be a finite number >= 0, got {self.contrast}")

    def batch(self, rows: list[dict], text_encoder):
        return compression_batch(rows, text_encoder, self.contrast > 0)

    def __call__(self, out, batch) -> torch.Tensor:
        loss = compression_loss(out.logp, out.n_tokens)
        if self.contrast:
            loss = loss + self.contrast * compression_contrast(out.logp, out.logp_other, batch.target_mask)
        return loss


STAGE2_OBJECTIVES: dict[str, type] = {}  # loss.kind -> its class
# Register a stage-2 objective under ``loss.kind: <kind>``.  It has ``check(key)``, ``needs_references``
# (and ``reads_decoder``, True when absent: False keeps the frozen decoder out of memory),
# ``batch(rows, text_encoder, references)`` and is called as ``objective(model(batch), batch) -> scalar loss``.
stage2_objective = registry(STAGE2_OBJECTIVES)


def _positive(key: str, name: str, value: float):
    if not (finite(value) and value > 0):
        raise ConfigError(f"key '{key}.{name}' must be a finite number > 0, got {value}")


@stage2_objective("alignment")
@dataclasses.dataclass(frozen=True)
class AlignmentLoss:
    """Stage 2 on ``model.CandidateScores`` and an ``AlignmentBatch`` (its reference values);
    the settings are ``alignment_loss``'s."""

    needs_references = True  # ref_c and ref_r: from the reference stage's file, or online (reference.source)
    beta: float = 0.1
    tau: float = 0.1
    # paper: subtract the reference margin (as in DPO); code: add it (the authors' release)
    reference_sign: str = "paper"
    # true (measured best): no gradient through c_p = log p(pos|e_pos) (alignment_loss says why); false: as published
    detach_positive: bool = True

    def __post_init__(self):
        self.check("loss")

    def check(self, key: str):
        """Its settings, each error naming ``key.<field>``: a bad value is refused when it is built."""
        for name in ("beta", "tau"):
            _positive(key, name, getattr(self, name))
        if self.reference_sign not in ("paper", "code"):
            raise ConfigError(f"key '{key}.reference_sign': {self.reference_sign!r} is not 'paper' or 'code'")

    def __call__(self, out, batch) -> torch.Tensor:
        return alignment_loss(out.c_q, out.c_p, out.r, out.owner, batch.ref_c, batch.ref_r, self.beta, self.tau,
                              self.reference_sign, self.detach_positive)

    def batch(self, rows: list[dict], text_encoder, references):
        return alignment_batch(rows, text_encoder, references, p_no_grad=self.detach_positive)


@stage2_objective("infonce")
@dataclasses.dataclass(frozen=True)
class InfoNCELoss:
    """The contrastive baseline users would otherwise run in another tool: cross-entropy of each query's
    cosine to its positive against every document of the micro-batch (its own hard negatives, every other
    row's positive and negatives), over ``temperature``; on the export's embeddings, so the comparison with
    AutoRegEmbed is the same encoder, pooling, data, trainer and export."""

    needs_references = False
    reads_decoder = False  # embeddings only: stage 2 does not load the frozen decoder
    temperature: float = 0.05

    def __post_init__(self):
        self.check("loss")

    def check(self, key: str):
        _positive(key, "temperature", self.temperature)

    def batch(self, rows: list[dict], text_encoder, references):
        return contrast_batch(rows, text_encoder)

    def __call__(self, out, batch) -> torch.Tensor:
        return F.cross_entropy(out.q.float() @ out.d.float().T / self.temperature, batch.positive)
