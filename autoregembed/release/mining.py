"""``autoregembed mine``: hard negatives from a model's own embeddings, written as stage-2 rows.

For each query row {query, pos, instruction}: the corpus texts ranked by cosine to the query,
skipping the query and the positive themselves, the first ``skip_top`` ranks, near-duplicates of
the positive (cosine to it ≥ ``max_similarity``: likely unlabelled positives), and with a margin
every passage the query finds nearly as close as its positive (``absolute_margin``: cosine above
cos(query, pos) - margin; ``relative_margin``: above cos(query, pos) x (1 - margin), as
sentence-transformers' ``mine_hard_negatives``); only ranks below ``range_max`` (FlagEmbedding's
``range_for_sampling``) are candidates.  ``sampling`` top takes the first ``negatives`` left, random
draws them from all that are left (seeded per row).  Query and corpus are embedded with the row's
instruction, as stage 2 encodes a query and its positive.  The ranking is exact (every passage scored,
``ExactSearch``) or, for corpora too large for that, a faiss index (``FaissSearch``, ``index=faiss``).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from ..ground.data import DataError, STAGE2_FIELDS, check_row, read_lines, records
from ..ground.errors import InputError
from ..ground.fingerprint import hash_folder


MINE_SAMPLING = ("top", "random")
MINE_INDEXES = ("exact", "faiss")


def check_mining(negatives: int, skip_top: int, max_similarity: float, range_max: int = 0,
                 absolute_margin: float | None = None, relative_margin: float | None = None,
                 sampling: str = "top", name=lambda key: key, index: str = "exact", index_lists: int = 0,
                 index_probe: int = 32) -> None:
    """The mining settings' ranges, each error naming the setting as ``name(key)`` spells it (a
    config key or a command-line flag); NaN fails every comparison, so it is refused too."""
    rules = [("negatives", negatives, negatives >= 1, ">= 1"), ("skip_top", skip_top, skip_top >= 0, ">= 0"),
             ("max_similarity", max_similarity, 0 < max_similarity <= 1, "a cosine in (0, 1] (1: no filter)"),
             ("range_max", range_max, range_max == 0 or range_max > skip_top,
              f"0 (no limit) or above skip_top ({skip_top})"),
             ("absolute_margin", absolute_margin, absolute_margin is None or 0 <= absolute_margin <= 2,
              "a cosine difference in [0, 2]"),
             ("relative_margin", relative_margin, relative_margin is None or 0 <= relative_margin < 1, "in [0, 1)"),
             ("sampling", sampling, sampling in MINE_SAMPLING, " or ".join(MINE_SAMPLING)),
             ("index", index, index in MINE_INDEXES, " or ".join(MINE_INDEXES)),
             ("index_lists", index_lists, index_lists >= 0, ">= 0 (0: 4 x sqrt(passages))"),
             ("index_probe", index_probe, index_probe >= 1, ">= 1")]
    for key, value, ok, rule in rules:
        if not ok:
            raise InputError(f"{name(key)} must be {rule}, got {value}")


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


def default_corpus(rows: list[dict]) -> list[str]:
    """Every positive and negative of the rows, each once, in order: what is mined from when no
    corpus is given."""
    return list(dict.fromkeys(t for r in rows for t in [r["pos"], *r["neg"]]))


QUERY_CHUNK = 1024  # queries scored against the whole corpus at once: memory is chunk x corpus, not rows x corpus


def _ranked(sims: np.ndarray, pool: int) -> np.ndarray:
    """Corpus indices by falling similarity (ties by index, as a stable sort), the first ``pool`` of
    them and every index tied with the last; all of them when the pool covers the corpus."""
    if pool >= len(sims):
        return np.argsort(-sims, kind="stable")
    threshold = np.partition(sims, len(sims) - pool)[len(sims) - pool]
    top = np.nonzero(sims >= threshold)[0]
    return top[np.argsort(-sims[top], kind="stable")]


class ExactSearch:
    """Every passage scored for every query: the reference, and what a corpus that fits the chunk's
    ``queries x passages`` scores in memory should use."""

    def __init__(self, corpus: np.ndarray):
        self.corpus = corpus

    BLOCK = 16_384  # corpus rows cast to float64 at a time (0.5 GB at 4096 dims; the corpus stays float32)

    def top(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, (passage indices, cosines), the ``k`` most similar first (``_ranked``).  The cosines
        are float64: in float32 two passages a few 1e-7 apart swap with the batching noise between
        encodings on 1 or 2 ranks, and the mined file would depend on the rank count."""
        q = np.asarray(queries, dtype=np.float64)
        sims = np.empty((len(q), len(self.corpus)))
        for start in range(0, len(self.corpus), self.BLOCK):
            sims[:, start : start + self.BLOCK] = q @ self.corpus[start : start + self.BLOCK].astype(np.float64).T
        return [(ids, row[ids]) for row in sims for ids in [_ranked(row, k)]]


class FaissSearch:
    """An inverted-file index (faiss ``IndexIVFFlat``, inner product on unit vectors: cosine) for corpora
    too large to score whole: ``lists`` clusters (0: 4 x sqrt(passages), at most passages / 39), each
    query reads the ``probe`` nearest; a corpus under 10,000 passages gets faiss' exact flat index.  On every GPU faiss sees when
    it is a GPU build.  Approximate: what the probed lists do not hold is never a candidate
    (``bench/mining_index.py`` measures recall against exact search)."""

    def __init__(self, corpus: np.ndarray, lists: int = 0, probe: int = 32, seed: int = 0):
        try:
            import faiss
        except ImportError:
            raise InputError("mining with index faiss needs the faiss package: pip install faiss-cpu (or a GPU "
                             "build of faiss)") from None
        x = np.ascontiguousarray(corpus, dtype=np.float32)
        n, dim = x.shape
        lists = lists or (min(int(4 * n ** 0.5), n // 39) if n >= 10_000 else 0)  # faiss asks 39 points a list
        if lists:
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, min(lists, n), faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(seed).choice(n, min(n, 64 * lists), replace=False)
            index.train(x[np.sort(sample)])
            index.nprobe = probe
        else:
            index = faiss.IndexFlatIP(dim)
        if getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(x)
        self.index, self.n = index, n

    def top(self, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.n))
        return [(i[i >= 0].astype(np.int64), s[i >= 0]) for s, i in zip(scores, ids)]


def corpus_search(corpus: np.ndarray, index: str = "exact", lists: int = 0, probe: int = 32):
    """The search ``mine.index`` names over the embedded corpus."""
    return ExactSearch(corpus) if index == "exact" else FaissSearch(corpus, lists, probe)


def mining_fingerprint(model_dir: str, rows: list[dict], settings: dict) -> str:
    """What a mined file depends on: the model's files, the rows (in order, every field) and the
    mining settings; a resumed run keeps a mined file whose fingerprint is unchanged."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    hash_folder(h, model_dir)
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def mine_negatives(encoder, rows: list[dict], corpus: list[str], negatives: int, skip_top: int = 0,
                   max_similarity: float = 0.95, batch_size: int = 64, show_progress_bar: bool | str = False,
                   range_max: int = 0, absolute_margin: float | None = None, relative_margin: float | None = None,
                   sampling: str = "top", seed: int = 0, index: str = "exact", index_lists: int = 0,
                   index_probe: int = 32) -> list[dict]:
    """Stage-2 rows with ``negatives`` mined negatives each (fewer when the corpus runs out): the
    passages the module docstring allows, the most similar first (``sampling`` top) or drawn at
    random among them (random, seeded by ``seed`` and the row's index: the same file every run),
    found by ``index`` (``corpus_search``).  ``mining_embeddings`` then ``select_negatives``."""
    check_mining(negatives, skip_top, max_similarity, range_max, absolute_margin, relative_margin, sampling,
                 index=index, index_lists=index_lists, index_probe=index_probe)
    return select_negatives(rows, corpus, mining_embeddings(encoder, rows, corpus, batch_size, show_progress_bar),
                            negatives, skip_top, max_similarity, range_max, absolute_margin, relative_margin,
                            sampling, seed, index, index_lists, index_probe)


def mining_embeddings(encoder, rows: list[dict], corpus: list[str], batch_size: int = 64,
                      show_progress_bar: bool | str = False) -> dict[str, tuple] | None:
    """instruction -> (corpus, queries, positives) embeddings, each text group under its rows' instruction;
    None where ``encoder.encode`` returns None (a rank of a sharded encoding other than the one that
    gathers it)."""
    out = {}
    for instruction in dict.fromkeys(r["instruction"] for r in rows):
        group = [r for r in rows if r["instruction"] == instruction]
        out[instruction] = tuple(encoder.encode(texts, batch_size=batch_size, instruction=instruction,
                                                show_progress_bar=show_progress_bar)
                                 for texts in (corpus, [r["query"] for r in group], [r["pos"] for r in group]))
    if any(e is None for embeddings in out.values() for e in embeddings):
        return None
    # float32 as encoded, never copied: a float64 copy of a 1M x 4096 corpus was 32 GB more on rank 0
    return {k: tuple(np.asarray(e, dtype=np.float32) for e in v) for k, v in out.items()}


def select_negatives(rows: list[dict], corpus: list[str], embeddings: dict[str, tuple], negatives: int,
                     skip_top: int = 0, max_similarity: float = 0.95, range_max: int = 0,
                     absolute_margin: float | None = None, relative_margin: float | None = None,
                     sampling: str = "top", seed: int = 0, index: str = "exact", index_lists: int = 0,
                     index_probe: int = 32) -> list[dict]:
    """``mine_negatives``'s choice from ``embeddings`` (``mining_embeddings``), no model needed."""
    out: dict[int, dict] = {}
    for instruction, (c, q, p) in embeddings.items():
        members = [i for i, r in enumerate(rows) if r["instruction"] == instruction]
        group = [rows[i] for i in members]
        search = corpus_search(c, index, index_lists, index_probe)
        limit = range_max or len(corpus)
        want = negatives if sampling == "top" else limit  # random draws from every allowed candidate
        first = min(limit, 4 * (skip_top + negatives) + 16) if sampling == "top" else limit
        for start in range(0, len(group), QUERY_CHUNK):
            found = search.top(q[start : start + QUERY_CHUNK], first)
            for i in range(start, min(start + QUERY_CHUNK, len(group))):
                r, p_i = group[i], p[i].astype(np.float64)  # float64 as the search's cosines
                s_pos = float(q[i] @ p_i)
                ceiling = min(s_pos - absolute_margin if absolute_margin is not None else np.inf,
                              s_pos * (1 - relative_margin) if relative_margin is not None else np.inf)
                (ids, sims), pool = found[i - start], first
                while True:  # a pool filtered out too far is widened, so the result is the full sort's
                    candidates = []
                    for rank, (j, sim) in enumerate(zip(ids[:limit], sims[:limit])):
                        if len(candidates) == want:
                            break
                        if not (rank < skip_top or corpus[j] in (r["query"], r["pos"]) or
                                p_i @ c[j] >= max_similarity or sim > ceiling):
                            candidates.append(corpus[j])
                    if (sampling == "top" and len(candidates) == negatives) or pool >= limit or len(ids) < pool:
                        break  # enough, the whole range, or all the index finds
                    pool = min(limit, pool * 4)
                    (ids, sims), = search.top(q[i : i + 1], pool)
                if sampling == "random" and len(candidates) > negatives:
                    pick = np.random.default_rng([seed, members[i]]).choice(len(candidates), negatives, replace=False)
                    candidates = [candidates[k] for k in sorted(pick)]
                chosen = candidates[:negatives]
                if chosen:
                    out[members[i]] = {**r, "neg": chosen}  # its other fields (a document instruction) kept
    return [out[i] for i in sorted(out)]  # the input's order
