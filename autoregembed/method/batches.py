"""Rows -> typed model inputs, one type per kind of decoder pass (tokenisation follows tokenization.py).

NamedTuples, so DeepSpeed's ZeRO-3 hooks see the tensors inside them (they walk tuples).  Each
carries the number of target tokens it scores as a host integer, counted while the masks are
still on the CPU: the decoder pass then compacts the scored positions without reading a count
back from the GPU (a synchronisation per micro-step).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .tokenization import TextEncoder


class CompressionBatch(NamedTuple):
    """Stage 1 (and the final-norm calibration): texts to compress and the targets to rebuild."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    contrast: bool = False  # also score each target with the previous row's compressed tokens (stage1_loss.contrast)
    target_tokens: int | None = None  # target_mask.sum() and attention_mask.sum(), counted on the host
    input_tokens: int | None = None


class CandidateBatch(NamedTuple):
    """Queries as encoder inputs; each query's positive and every negative as decoder targets
    (``owner[i]``: the query of negative i).  Reference scoring scores exactly this."""

    q_input_ids: torch.Tensor
    q_attention_mask: torch.Tensor
    pos_ids: torch.Tensor
    pos_mask: torch.Tensor
    neg_ids: torch.Tensor
    neg_mask: torch.Tensor
    owner: torch.Tensor
    pos_tokens: int | None = None  # pos_mask.sum(), neg_mask.sum() and q_attention_mask.sum(), on the host
    neg_tokens: int | None = None
    q_tokens: int | None = None


class AlignmentBatch(NamedTuple):
    """Stage 2: the candidates, the positives as encoder inputs too (for c_p), and the stage-1
    reference values ref_c [B] and ref_r [N] of c_q and r.  ``p_no_grad``: c_p is a target
    (``loss.detach_positive``), so the positives' encoder rows and their pos|e_p decoder rows run
    without gradient: the same values, no backward (nor activations kept) for work no gradient reaches."""

    candidates: CandidateBatch
    p_input_ids: torch.Tensor
    p_attention_mask: torch.Tensor
    ref_c: torch.Tensor
    ref_r: torch.Tensor
    p_tokens: int | None = None  # p_attention_mask.sum(), counted on the host
    p_no_grad: bool = False


class ContrastBatch(NamedTuple):
    """A contrastive objective's inputs (loss.kind=infonce): the queries and every distinct document of
    the micro-batch (each row's positive and negatives) as encoder inputs; ``positive[i]``: the column
    of query i's positive.  Documents are distinct, so a text that is one row's positive and another's
    negative is one column, the first row's label, never a negative of itself."""

    q_input_ids: torch.Tensor
    q_attention_mask: torch.Tensor
    d_input_ids: torch.Tensor
    d_attention_mask: torch.Tensor
    positive: torch.Tensor
    q_tokens: int | None = None  # q_attention_mask.sum() and d_attention_mask.sum(), on the host
    d_tokens: int | None = None


def limit_negatives(row: dict, max_negatives: int | None) -> dict:
    return row if max_negatives is None else {**row, "neg": row["neg"][:max_negatives]}


def with_in_batch_negatives(rows: list[dict], pool_rows: list[dict] | None = None) -> list[dict]:
    """Each row's negatives extended by every other row's positive and negatives (its own first,
    then in row order, each text once, never its own positive): B queries, up to B(1+N) candidates
    each, all scored in one decoder pass.  ``pool_rows``: the rows whose texts are the pool (every
    rank's micro-batch, with cross-device negatives); default ``rows``."""
    pool = list(dict.fromkeys(t for r in (rows if pool_rows is None else pool_rows) for t in [r["pos"], *r["neg"]]))
    return [{**r, "neg": list(dict.fromkeys([*r["neg"], *(t for t in pool if t != r["pos"])]))} for r in rows]


def compression_batch(rows: list[dict], te: TextEncoder, contrast: bool = False) -> CompressionBatch:
    enc = te.encode_inputs([r["context"] for r in rows], [r["instruction"] for r in rows])
    tgt = te.encode_targets([r["output"] for r in rows])
    return CompressionBatch(enc["input_ids"], enc["attention_mask"], tgt["target_ids"], tgt["target_mask"], contrast,
                            int(tgt["target_mask"].sum()), int(enc["attention_mask"].sum()))


def candidate_batch(rows: list[dict], te: TextEncoder) -> CandidateBatch:
    q = te.encode_inputs([r["query"] for r in rows], [r["instruction"] for r in rows])
    pos = te.encode_targets([r["pos"] for r in rows])
    negs = te.encode_targets([n for r in rows for n in r["neg"]])
    owner = torch.tensor([i for i, r in enumerate(rows) for _ in r["neg"]], dtype=torch.long)
    return CandidateBatch(q["input_ids"], q["attention_mask"], pos["target_ids"], pos["target_mask"],
                          negs["target_ids"], negs["target_mask"], owner, int(pos["target_mask"].sum()),
                          int(negs["target_mask"].sum()), int(q["attention_mask"].sum()))


def alignment_batch(rows: list[dict], te: TextEncoder, refs, p_no_grad: bool = False) -> AlignmentBatch:
    """``refs.lookup(row)`` gives (ref log p(pos|e_q), [ref log p(neg_i|e_q)]) (refscores.ReferenceScores).
    ``refs`` None: the reference values are NaN until ``refscores.online_references`` fills them
    (a batch that skipped it yields a NaN loss, which stops the run).  ``p_no_grad``: see AlignmentBatch."""
    p = te.encode_inputs([r["pos"] for r in rows], [r.get("document_instruction") or r["instruction"] for r in rows])
    candidates = candidate_batch(rows, te)
    if refs is None:
        nan = float("nan")
        ref_c, ref_r = torch.full((len(rows),), nan), torch.full(candidates.owner.shape, nan)
    else:
        looked_up = [refs.lookup(r) for r in rows]
        ref_c = torch.tensor([c for c, _ in looked_up], dtype=torch.float32)
        ref_r = torch.tensor([v for _, rs in looked_up for v in rs], dtype=torch.float32)
    return AlignmentBatch(candidates, p["input_ids"], p["attention_mask"], ref_c, ref_r, int(p["attention_mask"].sum()),
                          p_no_grad)


def contrast_batch(rows: list[dict], te: TextEncoder) -> ContrastBatch:
    """Queries through their instruction, documents through their row's document instruction (its
    instruction where it names none), as ``alignment_batch`` encodes the positives."""
    def document(r, text):
        return text, r.get("document_instruction") or r["instruction"]

    docs = list(dict.fromkeys([document(r, r["pos"]) for r in rows] + [document(r, n) for r in rows for n in r["neg"]]))
    column = {d: i for i, d in enumerate(docs)}
    q = te.encode_inputs([r["query"] for r in rows], [r["instruction"] for r in rows])
    d = te.encode_inputs([t for t, _ in docs], [i for _, i in docs])
    positive = torch.tensor([column[document(r, r["pos"])] for r in rows], dtype=torch.long)
    return ContrastBatch(q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"], positive,
                         int(q["attention_mask"].sum()), int(d["attention_mask"].sum()))


def token_count(batch) -> int:
    """Non-padding tokens the batch feeds the encoder and the decoder (every ``*mask`` field)."""
    total = 0
    for name, value in zip(type(batch)._fields, batch):
        if isinstance(value, tuple):
            total += token_count(value)
        elif name.endswith("mask"):
            total += int(value.sum())
    return total


def to_device(batch, device):
    """The same batch type with every tensor on ``device`` (other fields as they are).  To a GPU
    through pinned memory without waiting: the host goes on to the next batch while it copies."""
    device = torch.device(device)

    def move(t):
        if device.type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)

    return type(batch)(*(to_device(v, device) if isinstance(v, tuple) else move(v) if torch.is_tensor(v) else v
                         for v in batch))
