"""The AutoRegEmbed module: a trainable encoder that writes k compressed tokens and a
frozen decoder that scores text conditioned on them.

The module is what DeepSpeed wraps; only the encoder's parameters are trainable.  The frozen
decoder is either a registered submodule (sharded with the encoder under ZeRO-3:
``model.shard_decoder``) or held outside the module's parameters, whole on every device, where
no ZeRO hook gathers weights that never get a gradient.  The decoder never produces full logits: its last
hidden states go through ``sequence_logprobs`` (see logprobs.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .batches import AlignmentBatch, CandidateBatch, CompressionBatch, ContrastBatch
from ..ground.errors import InputError
from .logprobs import sequence_logprobs
from .scorers import Scorer, scorer_for
from .packing import Packing
from .shared_prefix import with_shared_prefix
from .tokenization import decoder_layout


def compressed_states(last_hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k EMBED-token hidden states [B, k, D]: with right padding they end each row."""
    end = attention_mask.sum(dim=1)
    idx = end[:, None] - k + torch.arange(k, device=end.device)[None, :]
    return last_hidden.gather(1, idx[..., None].expand(-1, -1, last_hidden.shape[-1]))


def pool_embedding(compressed: torch.Tensor, positions: list[int] | None = None) -> torch.Tensor:
    """The text embedding: mean of e_1..e_k (``positions``, 0-based: of those only), L2-normalised
    (compare by cosine)."""
    if positions is not None:
        compressed = compressed[:, positions]
    return F.normalize(compressed.float().mean(dim=1), dim=-1)


def pooled_positions(spec: str, k: int) -> list[int] | None:
    """``eval.pooling`` as 0-based positions of e_1..e_k: "all" (None: the published mean of every
    e_i), "all_but_last" (e_1..e_{k-1}: the position read next to the decoder's target carries most of
    what every text shares), or 1-based positions "1,2,3".  ValueError names what is wrong."""
    if spec == "all":
        return None
    if spec == "all_but_last":
        if k < 2:
            raise ValueError("'all_but_last' needs at least 2 compressed tokens")
        return list(range(k - 1))
    try:
        chosen = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"{spec!r} is not all, all_but_last or comma-separated positions like 1,2,3") from None
    if not chosen or len(set(chosen)) != len(chosen) or not all(1 <= i <= k for i in chosen):
        raise ValueError(f"{spec!r}: positions must be distinct and in 1..{k} (the compressed tokens e_1..e_{k})")
    return sorted(i - 1 for i in chosen)


class LogprobHead(nn.Module):
    """Scores decoder hidden states against the frozen LM head through a scorer backend (scorers.py);
    the decoder's lm_head module itself is never called.

    A module of its own so that under ZeRO-3 DeepSpeed's hooks gather the head weight (registered as
    this module's external parameter) for its forward and again for its backward, where
    cut-cross-entropy reads it.  (Gathering it for the forward alone, for our backend, fails where the
    head is tied to the word embeddings: DeepSpeed will not release a weight another module holds.)
    """

    def __init__(self, decoder: nn.Module, scorer: Scorer | str = "auto"):
        super().__init__()
        self._decoder = [decoder]  # a list keeps the decoder out of this module's parameters
        self.scorer = scorer_for(scorer)
        if hasattr(self.weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self._decoder[0].get_output_embeddings().weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, n_scored: int | None = None) -> torch.Tensor:
        return sequence_logprobs(hidden, self.weight, labels, self.scorer, n_scored)


def _freeze(decoder: nn.Module):
    """The decoder is frozen here and only here: no gradient to its weights, no dropout in any mode."""
    for p in decoder.parameters():
        p.requires_grad_(False)
    for name in [k for k, v in decoder.config.to_dict().items() if isinstance(v, float)]:
        if name.endswith(("dropout", "pdrop")):
            setattr(decoder.config, name, 0.0)
    for m in decoder.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


class Reconstruction(NamedTuple):
    """Stage 1's result: summed log p(target | e) per row and the number of target tokens scored;
    with a contrast batch also log p(target_i | e_{i-1}), each target given the previous row's e."""

    logp: torch.Tensor
    n_tokens: torch.Tensor
    logp_other: torch.Tensor | None = None


class InformationProbe(NamedTuple):
    """A stage-1 batch to score without gradient twice: with each row's own compressed tokens and
    with their mean over the batch (one vector for every text)."""

    batch: CompressionBatch


class InformationGap(NamedTuple):
    """Summed log p(target | e) per row with the row's own e (``own``) and with the batch mean of e
    (``shared``). What own gains over shared is the information e carries about its own text;
    the rest of stage 1's gain over the bare decoder is a prefix that fits every text."""

    own: torch.Tensor
    shared: torch.Tensor
    n_tokens: torch.Tensor


class CandidateScores(NamedTuple):
    """c_q [B] = log p(pos | e_q), r [N] = log p(neg_i | e_q) with owner [N] the query of each
    negative, and c_p [B] = log p(pos | e_pos) when the positives were encoded too (stage 2)."""

    c_q: torch.Tensor
    r: torch.Tensor
    owner: torch.Tensor
    c_p: torch.Tensor | None = None


class Embeddings(NamedTuple):
    """A ``ContrastBatch``'s embeddings (the export's: pooled, L2-normalised): queries [B, D] and
    documents [M, D], from one encoder pass."""

    q: torch.Tensor
    d: torch.Tensor


class AutoRegEmbedModel(nn.Module):
    """Compresses and scores; the objectives live in losses.py and take this module's results."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, k: int, decoder_bos_id: int | None = None,
                 scorer: Scorer | str = "auto", decoder_in_module: bool = True, packed: bool = False):
        """encoder: a base transformer (e.g. LlamaModel) returning last_hidden_state.
        decoder: the frozen causal LM (its parameters are frozen here); None for a model that only embeds
        (an objective on embeddings alone, ``loss.kind=infonce``: 13.5 GB of bf16 weights not held at 7B),
        which then cannot ``score``.
        decoder_bos_id: None, the method as published: the decoder reads [e_1..e_k ; target+EOS].
        A token id: the decoder reads that token first, [BOS ; e_1..e_k ; target+EOS]
        (``model.decoder_bos``).  Why: a pretrained LM parks attention on its first position
        (the attention sink); without a BOS, e_1 is pushed to become that sink, shared by every
        text (docs/experiments.md).
        scorer: the LM head's scorer backend, or its name (scorers.scorer_for).
        decoder_in_module: false keeps the decoder out of ``parameters()``, ``state_dict()``,
        ``.to()`` and DeepSpeed's view (the caller places it on its device); ``train()`` still
        reaches it.
        packed: every encoder and decoder pass runs padding-free (packing.py); the same values."""
        super().__init__()
        self.encoder = encoder
        self.packed = packed
        if decoder_in_module:
            self.decoder = decoder
        else:
            object.__setattr__(self, "decoder", decoder)  # an attribute, not a registered submodule
        self.k = k
        self.decoder_bos_id = decoder_bos_id
        self.shared_prefix: torch.Tensor | None = None  # model.shared_prefix (shared_prefix.py), set by its owner
        self.pooled: list[int] | None = None  # the e_i ``embed`` averages (eval.pooling), set by its owner; None: all
        self.head = None
        if decoder is None:
            return
        _freeze(decoder)
        self.head = LogprobHead(decoder, scorer)
        cfg = decoder.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            raise InputError(f"key 'model.base': {cfg.model_type} scales or soft-caps its logits, which the fused "
                             f"scorer does not support")
        if getattr(decoder.get_output_embeddings(), "bias", None) is not None:
            raise InputError("key 'model.base': an LM head with a bias is not supported by the fused scorer")

    def train(self, mode: bool = True):
        """The frozen decoder follows ``mode`` like the encoder, deliberately: Transformers applies
        gradient checkpointing only in training mode, and stage 2 keeps the decoder's activations
        for 1 + N candidates per query.  ``_freeze`` zeroed its dropouts, so both modes compute the same."""
        super().train(mode)
        if "decoder" not in self._modules and self.decoder is not None:
            self.decoder.train(mode)
        return self

    # ---- the two halves -------------------------------------------------------------
    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tokens: int | None = None) -> torch.Tensor:
        """e_1..e_k [B, k, D]; n_tokens: attention_mask.sum() as a host integer, when the batch carries it."""
        if not self.packed:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return compressed_states(hidden, attention_mask, self.k)
        p = Packing.of(attention_mask, n_tokens)
        hidden = self.encoder(input_ids=p.pack(input_ids), **p.attention_kwargs()).last_hidden_state[0]
        ends = p.cu_seqlens[1:].long()  # each row's EMBED tokens are its last k
        return hidden[ends[:, None] - self.k + torch.arange(self.k, device=ends.device)]

    def score(self, compressed: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
              n_scored: int | None = None) -> torch.Tensor:
        """Summed log p(target | compressed) per row, fp32 [S]; differentiable w.r.t. compressed only.
        n_scored: target_mask.sum() as a host integer, when the batch carries it (batches.py)."""
        if self.decoder is None:
            raise RuntimeError("this model was built without the decoder (its objective reads embeddings only)")
        compressed = with_shared_prefix(compressed, self.shared_prefix)
        lay = decoder_layout(target_ids, target_mask, compressed.shape[1], self.decoder_bos_id)
        tok = self.decoder.get_input_embeddings()(lay.ids)
        inputs = torch.cat([tok[:, : lay.n_bos], compressed.to(tok.dtype), tok[:, lay.n_bos :]], dim=1)
        if self.packed:  # every row reads its n_bos + k prefix positions and its target
            prefix = lay.n_bos + compressed.shape[1]
            p = Packing.of(lay.attention_mask, None if n_scored is None else n_scored + len(lay.ids) * prefix)
            packed = self.decoder.get_decoder()(inputs_embeds=p.pack(inputs), **p.attention_kwargs()).last_hidden_state
            hidden = p.unpack(packed, inputs.shape[:2])
        else:
            hidden = self.decoder.get_decoder()(inputs_embeds=inputs, attention_mask=lay.attention_mask).last_hidden_state
        return self.head(hidden, lay.labels, n_scored)

    def embed(self, input_ids, attention_mask) -> torch.Tensor:
        return pool_embedding(self.compress(input_ids, attention_mask), self.pooled)

    # ---- one forward per batch type (the engine calls this, so ZeRO-3 gathers and prefetches) --
    def forward(self, batch: CompressionBatch | CandidateBatch | AlignmentBatch):
        if isinstance(batch, CompressionBatch):
            e = self.compress(batch.input_ids, batch.attention_mask, batch.input_tokens)
            if not batch.contrast:
                return Reconstruction(self.score(e, batch.target_ids, batch.target_mask, batch.target_tokens),
                                      batch.target_mask.sum())
            own, other = self._score_pair(e, e.roll(1, dims=0), batch)  # other: the previous row's e
            return Reconstruction(own, batch.target_mask.sum(), other)
        if isinstance(batch, InformationProbe):
            return self.information_gap(batch.batch)
        if isinstance(batch, AlignmentBatch):
            positives = (batch.p_input_ids, batch.p_attention_mask, batch.p_tokens)
            if batch.p_no_grad:
                return self._candidate_scores_positive_as_target(batch.candidates, positives)
            return self.candidate_scores(batch.candidates, positives)
        if isinstance(batch, CandidateBatch):
            return self.candidate_scores(batch)
        if isinstance(batch, ContrastBatch):
            ids, mask = _stack_padded([batch.q_input_ids, batch.d_input_ids], [batch.q_attention_mask, batch.d_attention_mask])
            known = batch.q_tokens is not None and batch.d_tokens is not None
            e = pool_embedding(self.compress(ids, mask, batch.q_tokens + batch.d_tokens if known else None), self.pooled)
            return Embeddings(e[: batch.q_input_ids.shape[0]], e[batch.q_input_ids.shape[0] :])
        raise TypeError(f"no forward for a {type(batch).__name__}")

    @torch.no_grad()
    def information_gap(self, batch: CompressionBatch) -> InformationGap:
        e = self.compress(batch.input_ids, batch.attention_mask, batch.input_tokens)
        own, shared = self._score_pair(e, e.mean(dim=0, keepdim=True).expand_as(e), batch)
        return InformationGap(own, shared, batch.target_mask.sum())

    def _score_pair(self, e: torch.Tensor, other: torch.Tensor, batch: CompressionBatch):
        """Summed log p(target_i | e_i) and log p(target_i | other_i) per row, in one decoder pass."""
        n = None if batch.target_tokens is None else 2 * batch.target_tokens
        both = self.score(torch.cat([e, other]), batch.target_ids.repeat(2, 1), batch.target_mask.repeat(2, 1), n)
        return both[: e.shape[0]], both[e.shape[0] :]

    def candidate_scores(self, batch: CandidateBatch, positives: tuple | None = None) -> CandidateScores:
        """One encoder pass over the queries (and ``positives`` = (input_ids, attention_mask, their
        token count or None), when given) and one decoder pass over every candidate."""
        b = batch.q_input_ids.shape[0]
        if positives is not None:
            ids, mask = _stack_padded([batch.q_input_ids, positives[0]], [batch.q_attention_mask, positives[1]])
            known = batch.q_tokens is not None and positives[2] is not None
            comp = self.compress(ids, mask, batch.q_tokens + positives[2] if known else None)
            e_q, conds = comp[:b], [comp[:b], comp[b:]]
        else:
            e_q = self.compress(batch.q_input_ids, batch.q_attention_mask, batch.q_tokens)
            conds = [e_q]
        n_pos = len(conds)  # the positive, given e_q (and e_p)
        t_ids, t_mask = _stack_padded([batch.pos_ids] * n_pos + [batch.neg_ids], [batch.pos_mask] * n_pos + [batch.neg_mask])
        n = None if batch.pos_tokens is None else n_pos * batch.pos_tokens + batch.neg_tokens
        logp = self.score(torch.cat(conds + [e_q[batch.owner]]), t_ids, t_mask, n)
        return CandidateScores(logp[:b], logp[n_pos * b :], batch.owner, logp[b : 2 * b] if positives is not None else None)

    def _candidate_scores_positive_as_target(self, batch: CandidateBatch, positives: tuple) -> CandidateScores:
        """``candidate_scores`` with c_p computed without gradient (its own encoder and decoder passes
        under no_grad), for a loss that holds c_p as a target: the same values and gradients, without
        the backward through the positives' rows."""
        with torch.no_grad():
            c_p = self.score(self.compress(*positives), batch.pos_ids, batch.pos_mask, batch.pos_tokens)
        scores = self.candidate_scores(batch)
        return scores._replace(c_p=c_p)


def _stack_padded(ids_list, mask_list):
    """Concatenate right-padded batches of different widths along the batch dimension."""
    width = max(t.shape[1] for t in ids_list)
    pad = lambda t, w: F.pad(t, (0, w - t.shape[1]))  # noqa: E731  (padding value 0 is masked out)
    return (torch.cat([pad(t, width) for t in ids_list]), torch.cat([pad(m, width) for m in mask_list]))
