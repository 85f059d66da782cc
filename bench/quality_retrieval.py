"""Retrieval in bench/quality.py: every arm ranks the classic test collections of ../shared/data/ir, beside
STS, with BM25 as the lexical floor.

Settings are chosen on NPL (``--split tune``) and reported on Cranfield and CISI (``--split report``), as
STS-B dev's halves are.  An arm's queries go through its query instruction and its documents through its
document instruction (``Encoder.encode_query`` / ``encode_document``); documents are abstracts, longer
than the NLI sentences the arms train on, so every arm reads up to ``max_len`` tokens of each (its
training budget is 64).  BM25 is Lucene's (BEIR's Elasticsearch baseline; k1 1.2, b 0.75) through
bm25s, on lowercased alphanumeric tokens of "title text" as the collections' README tokenizes them (it
reads 0.36 / 0.34 / 0.35 nDCG@10 on NPL / Cranfield / CISI; Robertson's idf, which zeroes words in half
the documents, reads 0.36 / 0.34 / 0.35 too).
"""
from __future__ import annotations

import os
import re

import numpy as np

from harness import SHARED_DATA  # bench/harness.py, beside this script

from autoregembed.release.retrieval import RetrievalSet, metrics, read_beir, retrieval_eval

IR = os.path.join(SHARED_DATA, "ir")
COLLECTIONS = {"tune": ("npl",), "report": ("cranfield", "cisi")}
KEPT = ("ndcg@10", "recall@100")  # what a record keeps of each collection's metrics


def collections(split: str) -> dict[str, RetrievalSet]:
    """The split's collections, read once; {} where ../shared has none (the arms are then scored on STS alone)."""
    names = [n for n in COLLECTIONS[split] if os.path.isdir(os.path.join(IR, n))]
    return {n: read_beir(os.path.join(IR, n)) for n in names}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def bm25(data: RetrievalSet) -> dict:
    """BM25's ``metrics`` on ``data`` (every document scored for every query)."""
    import bm25s

    qids, dids = list(data.queries), list(data.corpus)
    index = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    index.index([_words(data.corpus[d]) for d in dids], show_progress=False)
    scores = np.stack([index.get_scores(_words(data.queries[q])) for q in qids])
    return metrics(scores, qids, dids, data.qrels)


def score(encoder, sets: dict[str, RetrievalSet], max_len: int) -> dict:
    """{collection: {nDCG@10, recall@100}} of ``encoder`` (an Encoder, or anything with encode_query /
    encode_document and a ``max_text_len`` it reads), each text cut to ``max_len`` tokens."""
    budget = encoder.text_encoder if hasattr(encoder, "text_encoder") else encoder
    budget.max_text_len = max_len
    return {name: {k: round(v, 4) for k, v in retrieval_eval(encoder, data).items() if k in KEPT}
            for name, data in sets.items()}
