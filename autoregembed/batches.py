"""Rows -> model inputs for each stage (tokenisation follows tokenization.py)."""
from __future__ import annotations

import torch

from .tokenization import TextEncoder


def limit_negatives(row: dict, max_negatives: int | None) -> dict:
    return row if max_negatives is None else {**row, "neg": row["neg"][:max_negatives]}


def stage1_batch(rows: list[dict], te: TextEncoder) -> dict:
    enc = te.encode_inputs([r["context"] for r in rows], [r["instruction"] for r in rows])
    return {**enc, **te.encode_targets([r["output"] for r in rows])}


def candidates_batch(rows: list[dict], te: TextEncoder, with_positive_inputs: bool) -> dict:
    """Queries (and positives, for stage 2) as encoder inputs; every positive/negative as a target."""
    q = te.encode_inputs([r["query"] for r in rows], [r["instruction"] for r in rows])
    pos = te.encode_targets([r["pos"] for r in rows])
    negs = te.encode_targets([n for r in rows for n in r["neg"]])
    owner = torch.tensor([i for i, r in enumerate(rows) for _ in r["neg"]], dtype=torch.long)
    batch = {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
             "p_input_ids": None, "p_attention_mask": None,
             "pos_ids": pos["target_ids"], "pos_mask": pos["target_mask"],
             "neg_ids": negs["target_ids"], "neg_mask": negs["target_mask"], "owner": owner}
    if with_positive_inputs:
        p = te.encode_inputs([r["pos"] for r in rows], [r["instruction"] for r in rows])
        batch["p_input_ids"], batch["p_attention_mask"] = p["input_ids"], p["attention_mask"]
    return batch


def stage2_batch(rows: list[dict], te: TextEncoder, refs) -> dict:
    batch = candidates_batch(rows, te, with_positive_inputs=True)
    looked_up = [refs.lookup(r) for r in rows]
    batch["ref_c"] = torch.tensor([c for c, _ in looked_up], dtype=torch.float32)
    batch["ref_r"] = torch.tensor([v for _, rs in looked_up for v in rs], dtype=torch.float32)
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
