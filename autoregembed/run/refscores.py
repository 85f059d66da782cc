"""Reference scores: log p(pos|e_q) and log p(neg_i|e_q) under the stage-1 model, computed once.

Stored as safetensors with three tensors: ``keys`` [N, 16] uint8 (content hash of each
row, see data.row_key), ``offsets`` [N+1] int64 and ``scores`` [sum(1+n_i)] float32 (for
row j: scores[offsets[j]] is the positive, the rest its negatives in order).  The
metadata holds a fingerprint of everything that changes the scores (stage-1 weights,
decoder weights, tokenizer, k, truncation lengths, decoder BOS); stage 2 refuses a file whose
fingerprint differs from the one it computes, and a file of another format version.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..ground.atomic import atomic_file
from ..ground.data import row_key
from ..ground.errors import UserError
from ..ground.fingerprint import hash_folder

FORMAT = "autoregembed-reference-v2"  # v2: the sampled weight fingerprint


class ReferenceScoreError(UserError, RuntimeError):
    """A reference score file that is missing, corrupt, stale or does not cover the data."""


def fingerprint(stage1_dir: str, decoder_dir: str, k: int, max_text_len: int, max_target_len: int,
                decoder_bos: bool = False) -> str:
    """What the scores depend on, read cheaply: a few MB per weight file however large the model
    (hashing every byte of a 7B pair took minutes on every rank)."""
    h = hashlib.sha256()
    h.update(json.dumps([k, max_text_len, max_target_len, decoder_bos]).encode())
    hash_folder(h, stage1_dir)
    if os.path.isdir(decoder_dir):
        hash_folder(h, decoder_dir)
    else:  # a hub name: its resolved revision is the best we can do without downloading
        h.update(decoder_dir.encode())
    return h.hexdigest()


def save_scores(path: str, keys: list[bytes], scores: list[list[float]], fp: str):
    if len(keys) != len(scores):
        raise ValueError("one score list per key")
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + len(s))
    tensors = {
        "keys": torch.tensor([list(k) for k in keys], dtype=torch.uint8).reshape(len(keys), 16),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "scores": torch.tensor([v for s in scores for v in s], dtype=torch.float32),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"fingerprint": fp, "format": FORMAT})


class ReferenceScores:
    """Lookup of reference scores by row content."""

    def __init__(self, path: str, expected_fingerprint: str | None = None):
        if not os.path.exists(path):
            raise ReferenceScoreError(f"{path}: no reference scores; run the 'reference' stage first")
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            keys, offsets, scores = f.get_tensor("keys"), f.get_tensor("offsets"), f.get_tensor("scores")
        if meta.get("format") != FORMAT:
            raise ReferenceScoreError(f"{path}: reference scores of format {meta.get('format', '?')}, this version "
                                      f"reads {FORMAT}; recompute them with the 'reference' stage")
        if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
            raise ReferenceScoreError(
                f"{path}: these reference scores were computed with a different stage-1 model, decoder, "
                f"tokenizer or truncation (fingerprint {meta.get('fingerprint', '?')[:12]} != "
                f"{expected_fingerprint[:12]}); recompute them with the 'reference' stage")
        self.path = path
        self._index = {bytes(k.tolist()): (int(offsets[i]), int(offsets[i + 1])) for i, k in enumerate(keys)}
        self._scores = scores

    def __len__(self):
        return len(self._index)

    def lookup(self, row: dict) -> tuple[float, list[float]]:
        """(ref log p(pos|e_q), [ref log p(neg_i|e_q)]) for a stage-2 row."""
        span = self._index.get(row_key(row))
        if span is None:
            raise ReferenceScoreError(f"{self.path}: no reference score for the row with query "
                                      f"{row['query'][:60]!r}; the stage-2 data changed since scoring")
        vals = self._scores[span[0] : span[1]].tolist()
        if len(vals) != 1 + len(row["neg"]):
            raise ReferenceScoreError(f"{self.path}: row with query {row['query'][:60]!r} was scored with "
                                      f"{len(vals) - 1} negatives, the data has {len(row['neg'])}")
        return vals[0], vals[1:]

    def check_all(self, rows: list[dict], source: str):
        """Every row has its scores, checked before training starts rather than when a row is first
        drawn (hours in); the error names the first bad row and how many there are."""
        bad = []
        for i, row in enumerate(rows):
            try:
                self.lookup(row)
            except ReferenceScoreError as e:
                bad.append((i, e))
        if bad:
            i, e = bad[0]
            raise ReferenceScoreError(f"{source}: row {i + 1} (and {len(bad) - 1} more of {len(rows)}): {e}")


def reusable(path: str, expected_fingerprint: str, rows: list[dict]) -> str | None:
    """Why the score file at ``path`` cannot serve ``rows`` as it is (None: it can).  A resumed run
    keeps a current file rather than rescoring every row (hours for a large corpus on a 7B pair)."""
    if not os.path.exists(path):
        return "no score file yet"
    try:
        ReferenceScores(path, expected_fingerprint).check_all(rows, path)
    except Exception as e:  # stale, of other rows, or unreadable (a truncated copy): score again
        return str(e) or type(e).__name__
    return None


def online_references(engine, batch):
    """``batch`` (an AlignmentBatch) with ref_c / ref_r scored now, by the stage-2 model with its
    LoRA adapters disabled: the stage-1 model, whatever the candidates (``reference.source=online``).
    ``engine``: the DeepSpeed engine (every rank calls it: under ZeRO-3 the gathers are collectives)
    or the bare model."""
    from ..ground.lora import adapters_disabled

    was_training = engine.training
    engine.eval()  # as the reference stage scores: no dropout anywhere
    try:
        with torch.no_grad(), adapters_disabled(getattr(engine, "module", engine).encoder):
            ref = engine(batch.candidates)
    finally:
        engine.train(was_training)
    return batch._replace(ref_c=ref.c_q.float().detach(), ref_r=ref.r.float().detach())
