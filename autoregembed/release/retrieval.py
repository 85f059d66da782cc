"""Retrieval evaluation: how well an embedder ranks a corpus for each query, the figure embedders are
chosen by (STS alone says little about it).

A ``RetrievalSet`` is queries, a corpus and graded relevance (qrels), from a BEIR folder
(``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``: the layout BEIR and MTEB use) or from
stage-2 rows (``{query, pos, neg}``: each query's positive is its one relevant document, and every
positive and negative of the file is in the corpus).  Queries are encoded with the export's query
instruction and documents with its document instruction (``encode_query`` / ``encode_document``),
scored by cosine, and ranked exhaustively.  Metrics follow trec_eval (BEIR's): nDCG@10 with linear
gain, MRR@10, recall@100; queries without a relevant document are left out, as there.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np

from ..ground.data import records
from ..ground.errors import InputError


@dataclasses.dataclass
class RetrievalSet:
    name: str
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]  # query id -> {document id: grade > 0}


def read_beir(folder: str, split: str = "test") -> RetrievalSet:
    """A BEIR folder; a document's text is its title and text joined by a space, as BEIR embeds them."""
    def jsonl(name):  # the project's one reader (records): every error names the file and line
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise InputError(f"{folder}: no {name} (a BEIR folder holds corpus.jsonl, queries.jsonl and "
                             f"qrels/{split}.tsv)")
        for where, rec in records(path):
            if not (isinstance(rec, dict) and "_id" in rec and isinstance(rec.get("text"), str)):
                raise InputError(f"{where}: a BEIR record needs '_id' and a text field 'text'")
            yield rec

    corpus = {str(d["_id"]): " ".join(x for x in (d.get("title") or "", d["text"]) if x)
              for d in jsonl("corpus.jsonl")}
    queries = {str(q["_id"]): q["text"] for q in jsonl("queries.jsonl")}
    qrels: dict[str, dict[str, int]] = {}
    path = os.path.join(folder, "qrels", f"{split}.tsv")
    if not os.path.isfile(path):
        raise InputError(f"{folder}: no qrels/{split}.tsv")
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        for row in rows:
            if rows.line_num == 1 and row[:1] == ["query-id"]:
                continue
            try:
                qid, did, grade = row[0], row[1], int(row[2])
            except (IndexError, ValueError):
                raise InputError(f"{path}:{rows.line_num}: expected query-id, corpus-id, score") from None
            if grade > 0 and qid in queries and did in corpus:
                qrels.setdefault(qid, {})[did] = grade
    return RetrievalSet(os.path.basename(os.path.normpath(folder)), queries, corpus, qrels)


def from_rows(name: str, rows: list[dict]) -> RetrievalSet:
    """Stage-2 rows as a retrieval task: query i's relevant document is its positive; the corpus
    is every distinct positive and negative text."""
    texts: dict[str, str] = {}

    def doc_id(text: str) -> str:
        return texts.setdefault(text, f"d{len(texts)}")

    queries, qrels = {}, {}
    for i, r in enumerate(rows):
        queries[f"q{i}"] = r["query"]
        qrels[f"q{i}"] = {doc_id(r["pos"]): 1}
        for neg in [r["neg"]] if isinstance(r.get("neg"), str) else r.get("neg") or []:
            doc_id(neg)
    return RetrievalSet(name, queries, {i: t for t, i in texts.items()}, qrels)


def load(path: str) -> RetrievalSet:
    """eval.retrieval's set: a BEIR folder, or a JSONL file of stage-2 rows (every line checked:
    a bad one is named by file and line)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "queries.jsonl")):
        return read_beir(path)
    rows = []
    for where, r in records(path):
        if not (isinstance(r, dict) and isinstance(r.get("query"), str) and isinstance(r.get("pos"), str)):
            raise InputError(f"{where}: a retrieval row needs text fields 'query' and 'pos' (and 'neg')")
        rows.append(r)
    if not rows:
        raise InputError(f"{path}: no rows")
    return from_rows(os.path.splitext(os.path.basename(path))[0], rows)


def metrics(scores: np.ndarray, query_ids: list[str], doc_ids: list[str], qrels: dict[str, dict[str, int]],
            k: int = 10, recall_at: int = 100, per_query: dict | None = None) -> dict:
    """nDCG@k, MRR@k and recall@``recall_at`` (each a mean over judged queries) of ``scores`` [Q, D];
    ``per_query``, when given, receives each judged query's values, in ``query_ids``' order (paired.py)."""
    ndcg, mrr, recall = [], [], []
    depth = min(max(k, recall_at), scores.shape[1])
    for qi, qid in enumerate(query_ids):
        rel = qrels.get(qid)
        if not rel:
            continue
        top = np.argsort(-scores[qi], kind="stable")[:depth]
        grades = [rel.get(doc_ids[d], 0) for d in top]
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(grades[:k]))
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(rel.values(), reverse=True)[:k]))
        ndcg.append(dcg / ideal)
        mrr.append(next((1.0 / (i + 1) for i, g in enumerate(grades[:k]) if g > 0), 0.0))
        recall.append(sum(g > 0 for g in grades[:recall_at]) / len(rel))
    if not ndcg:
        raise InputError("retrieval: no query has a relevant document in the corpus")
    if per_query is not None:
        per_query.update({f"ndcg@{k}": np.asarray(ndcg), f"mrr@{k}": np.asarray(mrr),
                          f"recall@{recall_at}": np.asarray(recall)})
    return {f"ndcg@{k}": float(np.mean(ndcg)), f"mrr@{k}": float(np.mean(mrr)),
            f"recall@{recall_at}": float(np.mean(recall)), "queries": len(ndcg)}


def retrieval_eval(encoder, data: RetrievalSet, batch_size: int = 64, show_progress_bar: bool | str = False,
                   per_query: dict | None = None) -> dict:
    """``metrics`` of ``encoder`` (an Encoder: encode_query / encode_document) on ``data``; the
    progress shown is the corpus's (queries are the short part)."""
    qids, dids = list(data.queries), list(data.corpus)
    q = encoder.encode_query([data.queries[i] for i in qids], batch_size=batch_size)
    d = encoder.encode_document([data.corpus[i] for i in dids], batch_size=batch_size,
                                show_progress_bar=show_progress_bar)
    scores = q.astype(np.float64) @ d.astype(np.float64).T  # unit vectors: cosine
    if not np.isfinite(scores).all():
        raise InputError(f"retrieval on {data.name}: the model's embeddings are non-finite; the model is dead")
    return metrics(scores, qids, dids, data.qrels, per_query=per_query)
