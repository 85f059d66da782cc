"""The AutoRegEmbed module: a trainable encoder that writes k compressed tokens and a
frozen decoder that scores text conditioned on them.

The whole module is what DeepSpeed wraps, so both halves are sharded under ZeRO-3; only the
encoder's parameters are trainable.  The decoder never produces full logits: its last
hidden states go through ``sequence_logprobs`` (see logprobs.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .logprobs import sequence_logprobs
from .losses import alignment_loss, compression_loss
from .tokenization import decoder_layout


def compressed_states(last_hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The k EMBED-token hidden states [B, k, D]: with right padding they end each row."""
    end = attention_mask.sum(dim=1)
    idx = end[:, None] - k + torch.arange(k, device=end.device)[None, :]
    return last_hidden.gather(1, idx[..., None].expand(-1, -1, last_hidden.shape[-1]))


def pool_embedding(compressed: torch.Tensor) -> torch.Tensor:
    """The text embedding: mean of e_1..e_k, L2-normalised (compare by cosine)."""
    return F.normalize(compressed.float().mean(dim=1), dim=-1)


class LogprobHead(nn.Module):
    """Scores decoder hidden states against the frozen LM head through the fused path.

    A module of its own so that under ZeRO-3 DeepSpeed's hooks gather the head weight
    (registered as this module's external parameter) for its forward and again for its
    backward; the decoder's lm_head module itself is never called.
    """

    def __init__(self, decoder: nn.Module, scorer: str = "auto"):
        super().__init__()
        self._decoder = [decoder]  # a list keeps the decoder out of this module's parameters
        self.scorer = scorer
        if hasattr(self.weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, self.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self._decoder[0].get_output_embeddings().weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sequence_logprobs(hidden, self.weight, labels, self.scorer)


class AutoRegEmbedModel(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, k: int, beta: float = 0.1, tau: float = 0.1,
                 reference_sign: str = "paper", detach_positive: bool = False, decoder_bos_id: int | None = None,
                 scorer: str = "auto"):
        """encoder: a base transformer (e.g. LlamaModel) returning last_hidden_state.
        decoder: the frozen causal LM (its parameters are frozen here).
        decoder_bos_id: None, the method as published: the decoder reads [e_1..e_k ; target+EOS].
        A token id: the decoder reads that token first, [BOS ; e_1..e_k ; target+EOS]
        (``model.decoder_bos``).  Why: a pretrained LM parks attention on its first position
        (the attention sink); without a BOS, e_1 is pushed to become that sink, shared by every
        text (docs/experiments.md).
        scorer: who computes the LM head's softmax statistics (``logprobs.row_stats_for``)."""
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.k = k
        self.decoder_bos_id = decoder_bos_id
        self.beta, self.tau, self.reference_sign, self.detach_positive = beta, tau, reference_sign, detach_positive
        for p in decoder.parameters():
            p.requires_grad_(False)
        self.head = LogprobHead(decoder, scorer)
        cfg = decoder.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            raise NotImplementedError(f"{cfg.model_type}: logit soft-capping/scaling is not supported by the fused scorer")
        if getattr(decoder.get_output_embeddings(), "bias", None) is not None:
            raise NotImplementedError("an LM head with a bias is not supported by the fused scorer")

    # ---- the two halves -------------------------------------------------------------
    def compress(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return compressed_states(hidden, attention_mask, self.k)

    def score(self, compressed: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Summed log p(target | compressed) per row, fp32 [S]; differentiable w.r.t. compressed only."""
        lay = decoder_layout(target_ids, target_mask, compressed.shape[1], self.decoder_bos_id)
        tok = self.decoder.get_input_embeddings()(lay.ids)
        inputs = torch.cat([tok[:, : lay.n_bos], compressed.to(tok.dtype), tok[:, lay.n_bos :]], dim=1)
        hidden = self.decoder.get_decoder()(inputs_embeds=inputs, attention_mask=lay.attention_mask).last_hidden_state
        return self.head(hidden, lay.labels)

    def embed(self, input_ids, attention_mask) -> torch.Tensor:
        return pool_embedding(self.compress(input_ids, attention_mask))

    # ---- objectives (what the DeepSpeed engine calls) ----------------------------------
    def forward(self, stage: str, **batch):
        if stage == "stage1":
            return self.stage1_loss(**batch)
        if stage == "stage2":
            return self.stage2_loss(**batch)
        if stage == "reference":  # through the engine too, so ZeRO-3 prefetches as in training
            return self.candidate_scores(**batch)
        raise ValueError(f"unknown stage {stage!r}")

    def stage1_loss(self, input_ids, attention_mask, target_ids, target_mask):
        logp = self.score(self.compress(input_ids, attention_mask), target_ids, target_mask)
        return compression_loss(logp, target_mask.sum())

    def candidate_scores(self, q_input_ids, q_attention_mask, p_input_ids, p_attention_mask,
                         pos_ids, pos_mask, neg_ids, neg_mask, owner):
        """One encoder pass over queries+positives and one decoder pass over every candidate.

        Returns c_q = log p(pos|e_q), c_p = log p(pos|e_pos) (None when no positives are
        given) and r = log p(neg_i|e_q) for every negative.
        """
        b = q_input_ids.shape[0]
        with_pos = p_input_ids is not None
        if with_pos:
            ids, mask = _stack_padded([q_input_ids, p_input_ids], [q_attention_mask, p_attention_mask])
            comp = self.compress(ids, mask)
            e_q, e_p = comp[:b], comp[b:]
        else:
            e_q = self.compress(q_input_ids, q_attention_mask)
        conds = [e_q] + ([e_p] if with_pos else []) + [e_q[owner]]
        targets, tmasks = ([pos_ids] + ([pos_ids] if with_pos else []) + [neg_ids],
                           [pos_mask] + ([pos_mask] if with_pos else []) + [neg_mask])
        t_ids, t_mask = _stack_padded(targets, tmasks)
        logp = self.score(torch.cat(conds), t_ids, t_mask)
        c_q = logp[:b]
        c_p = logp[b : 2 * b] if with_pos else None
        return c_q, c_p, logp[(2 if with_pos else 1) * b :]

    def stage2_loss(self, q_input_ids, q_attention_mask, p_input_ids, p_attention_mask,
                    pos_ids, pos_mask, neg_ids, neg_mask, owner, ref_c, ref_r):
        c_q, c_p, r = self.candidate_scores(q_input_ids, q_attention_mask, p_input_ids, p_attention_mask,
                                            pos_ids, pos_mask, neg_ids, neg_mask, owner)
        return alignment_loss(c_q, c_p, r, owner, ref_c, ref_r, self.beta, self.tau, self.reference_sign,
                              self.detach_positive)


def _stack_padded(ids_list, mask_list):
    """Concatenate right-padded batches of different widths along the batch dimension."""
    width = max(t.shape[1] for t in ids_list)
    pad = lambda t, w: F.pad(t, (0, w - t.shape[1]))  # noqa: E731  (padding value 0 is masked out)
    return (torch.cat([pad(t, width) for t in ids_list]), torch.cat([pad(m, width) for m in mask_list]))
