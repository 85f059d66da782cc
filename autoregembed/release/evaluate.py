"""STS evaluation (Spearman x100 between cosine similarity and gold scores), the reports that
``autoregembed eval`` prints and a pipeline writes (STS, retrieval: retrieval.py), and their floor,
the untrained base read as the export reads text."""
from __future__ import annotations

import csv

import numpy as np

from ..ground.data import read_lines
from ..ground.errors import InputError


def read_sts(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """STS-B csv: tab-separated genre, file, year, id, score, sentence1, sentence2[, sources]."""
    a, b, gold = [], [], []
    rows = csv.reader(read_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        for row in rows:
            if not row:
                continue
            if len(row) < 7:
                raise InputError(f"{path}:{rows.line_num}: expected at least 7 tab-separated fields, got {len(row)}")
            try:
                gold.append(float(row[4]))
            except ValueError:
                raise InputError(f"{path}:{rows.line_num}: field 'score' is not a number: {row[4]!r}") from None
            a.append(row[5])
            b.append(row[6])
    except csv.Error as e:  # a field longer than csv.field_size_limit(), ...
        raise InputError(f"{path}:{rows.line_num}: {e}") from None
    if not gold:
        raise InputError(f"{path}: no rows")
    if len(set(gold)) < 2:
        raise InputError(f"{path}: every gold score is {gold[0]}; Spearman correlation needs at least two values")
    return a, b, np.asarray(gold)


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine over all pairs of distinct rows of L2-normalised ``emb``: how much of every
    embedding is one shared direction.  Why: a collapse onto one direction is a failure the
    reconstruction loss does not show (a normal value is no guarantee; docs/experiments.md)."""
    n = len(emb)
    if n < 2:
        raise InputError("mean pairwise cosine needs at least 2 embeddings")
    total = emb.astype(np.float64).sum(axis=0)
    return float((total @ total - n) / (n * (n - 1)))  # sum over i != j of e_i.e_j, rows have norm 1


def sts_eval(encoder, path: str, batch_size: int = 64, show_progress_bar: bool | str = True,
             items: dict | None = None) -> dict:
    """{"spearman": Spearman x100 of cosine vs gold, "mean_cosine": mean_pairwise_cosine of
    the sentences' embeddings}; ``items``, when given, receives each pair's cosine ("sts") and gold score
    ("gold"), in the file's order (paired.py).  Embeddings are L2-normalised, so cosine is their dot product."""
    a, b, gold = read_sts(path)
    uniq = sorted(set(a) | set(b))
    emb = encoder.encode(uniq, batch_size=batch_size, show_progress_bar=show_progress_bar)
    pos = {s: i for i, s in enumerate(uniq)}
    from scipy.stats import spearmanr  # here: scipy.stats costs every process that imports the trainer ~1 s

    emb64 = emb.astype(np.float64)  # float32 cosines tie by rounding, and Spearman ranks the ties arbitrarily
    cos = np.sum(emb64[[pos[s] for s in a]] * emb64[[pos[s] for s in b]], axis=1)
    spearman, finite = float(spearmanr(cos, gold).statistic * 100), bool(np.isfinite(emb64).all())
    if not finite or spearman != spearman:  # a NaN score is no result: never written as one
        raise InputError(f"STS on {path}: the model's score is not a number (its embeddings are "
                         f"{'the same for every text' if finite else 'non-finite'}); the model is dead, not evaluated")
    if items is not None:
        items.update(sts=cos, gold=gold)
    return {"spearman": spearman, "mean_cosine": mean_pairwise_cosine(emb)}


def sts_report(encoder, model: str, path: str, batch_size: int = 64, show_progress_bar: bool | str = True,
               items: dict | None = None) -> dict:
    """What ``autoregembed eval --sts`` prints and a pipeline writes to eval/result.json; ``items``: as
    ``sts_eval``'s (a verdict's paired intervals)."""
    r = sts_eval(encoder, path, batch_size, show_progress_bar, items)
    return {"model": model, "sts": path, "spearman_x100": round(r["spearman"], 2),
            "mean_pairwise_cosine": round(r["mean_cosine"], 4)}


def retrieval_report(encoder, path: str, batch_size: int = 64, show_progress_bar: bool | str = False,
                     items: dict | None = None) -> dict:
    """``retrieval.retrieval_eval`` on ``path`` (eval.retrieval: a BEIR folder or stage-2 rows), rounded;
    ``items``, when given, receives each judged query's nDCG@10 ("retrieval")."""
    from .retrieval import load, retrieval_eval

    per_query = None if items is None else {}
    r = retrieval_eval(encoder, load(path), batch_size, show_progress_bar, per_query=per_query)
    if items is not None:
        items["retrieval"] = per_query["ndcg@10"]
    return {"set": path, **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}


def base_report(base: str, model: str, path: str | None, batch_size: int = 64, pooling: str | None = None,
                show_progress_bar: bool | str = True, retrieval: str | None = None, items: dict | None = None) -> dict:
    """The untrained ``base``'s STS on ``path`` (and its retrieval on ``retrieval``), reading text as
    the export ``model`` does (``Encoder.untrained``): the floor its ``spearman_x100`` (and
    ``retrieval``) must beat, the keys ``sts_report`` adds to with ``autoregembed eval --base`` and
    ``eval.compare_base``.  Loaded after the export's own evaluation, so the two models never share the
    device, and in the export's dtype, so both are computed alike (a bf16 base checkpoint beside an
    fp32 CPU export would not be).  ``items``: as ``sts_eval``'s and ``retrieval_report``'s."""
    from transformers import AutoConfig

    from .encoder import Encoder
    from .meta import ExportMeta

    floor = Encoder.untrained(base, ExportMeta.read(model), dtype=AutoConfig.from_pretrained(model).dtype,
                              pooling=pooling)
    out = {"base_model": base}
    if path is not None:
        out["base_spearman_x100"] = round(sts_eval(floor, path, batch_size, show_progress_bar, items)["spearman"], 2)
    if retrieval is not None:
        out["base_retrieval"] = retrieval_report(floor, retrieval, batch_size, show_progress_bar, items)
    return out
