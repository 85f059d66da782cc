"""``autoregembed mine``: hard negatives from a model's own embeddings, written as stage-2 rows.

For each query row {query, pos, instruction}: the corpus texts ranked by cosine to the query,
skipping the query and the positive themselves, the first ``skip_top`` ranks, and near-duplicates
of the positive (cosine to it ≥ ``max_similarity``: likely unlabelled positives); the first
``negatives`` left become ``neg``.  Query and corpus are embedded with the row's instruction, as
stage 2 encodes a query and its positive.
"""
from __future__ import annotations

import numpy as np

from .data import DataError, STAGE2_FIELDS, check_row, read_lines, records
from .errors import InputError


def read_queries(path: str, with_negatives: bool = False) -> list[dict]:
    """Rows with query, pos and instruction; any ``neg`` is what gets mined, and is read (and
    required) only ``with_negatives``: the default corpus is every pos and neg of the file."""
    fields = STAGE2_FIELDS if with_negatives else {k: v for k, v in STAGE2_FIELDS.items() if k != "neg"}
    rows = [check_row(rec, fields, where) for where, rec in records(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def read_corpus(path: str) -> list[str]:
    """A .jsonl of {"text": ...} rows, or plain text, one passage per line (blank lines skipped)."""
    if path.endswith(".jsonl"):
        out = []
        for where, rec in records(path):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{where}: expected an object with a string field 'text'")
            out.append(rec["text"])
    else:
        out = [t for t in read_lines(path) if t.strip()]
    corpus = list(dict.fromkeys(out))
    if not corpus:
        raise DataError(f"{path}: no passages")
    return corpus


def mine_negatives(encoder, rows: list[dict], corpus: list[str], negatives: int, skip_top: int = 0,
                   max_similarity: float = 0.95, batch_size: int = 64) -> list[dict]:
    """Stage-2 rows with ``negatives`` mined negatives each (fewer when the corpus runs out)."""
    if negatives < 1:
        raise InputError(f"negatives must be >= 1, got {negatives}")
    out: dict[int, dict] = {}
    for instruction in dict.fromkeys(r["instruction"] for r in rows):
        index = [i for i, r in enumerate(rows) if r["instruction"] == instruction]
        group = [rows[i] for i in index]
        enc = lambda texts: encoder.encode(texts, batch_size=batch_size, instruction=instruction).astype(np.float64)
        c = enc(corpus)
        q, p = enc([r["query"] for r in group]), enc([r["pos"] for r in group])
        sims, to_pos = q @ c.T, p @ c.T
        for i, r in enumerate(group):
            chosen = []
            for rank, j in enumerate(np.argsort(-sims[i], kind="stable")):
                if len(chosen) == negatives:
                    break
                if rank < skip_top or corpus[j] in (r["query"], r["pos"]) or to_pos[i, j] >= max_similarity:
                    continue
                chosen.append(corpus[j])
            if chosen:
                out[index[i]] = {"query": r["query"], "pos": r["pos"], "neg": chosen, "instruction": instruction}
    return [out[i] for i in sorted(out)]  # the input's order
