"""What bench/quality.py's arms train and are scored on: stage-1 rows, the NLI triplets, STS-B dev's two
halves, and the fixed prompts and k every arm shares.

Why apart: the data decide which claim a table supports (no STS-B text in stage 1 by default; the
report half unseen while tuning), so they are read in one place, away from the training loop.
"""
from __future__ import annotations

import csv
import os
import random

from harness import SHARED_DATA as SHARED  # bench/harness.py, beside this script

from autoregembed.ground.data import load_rows, read_lines, write_jsonl

AUTOENCODE = "Reconstruct the original text."
INSTRUCTION = "Retrieve semantically similar text."
K = 5


ENTAIL = "Write a sentence that this text implies."


def _nli_rows() -> list[dict]:
    return load_rows(os.path.join(SHARED, "nli", "medi_nli.jsonl"), stage=2)


def stage1_file(path: str, corpus: str, entailment: bool, instruction: str = AUTOENCODE, n_sts: int = 3000,
                documents: list[str] = ()) -> str:
    """Stage-1 rows.  ``corpus``: "general" autoencodes the NLI sentences (MNLI/SNLI genres, none
    from STS-B); "general+stsb" adds ``n_sts`` STS-B train sentences, drawn from the genres and
    sources of the dev pairs the table reports (the ablation); "general+ir" adds ``documents``, the
    retrieval collections' own documents (stage 1 as unsupervised domain adaptation: raw text only, no
    queries, no judgments).  ``entailment`` mixes in rows that need the meaning, not the surface:
    premise -> the hypothesis it entails."""
    nli = _nli_rows()
    sents = [s for r in nli for s in [r["query"], r["pos"], *r["neg"]]]
    if corpus == "general+ir":
        if not documents:
            raise SystemExit("--stage1-corpus general+ir: no retrieval collection under ../shared/data/ir")
        sents = [d for d in documents if d.strip()] + sents  # Cranfield holds two empty documents
    if corpus == "general+stsb":
        with open(os.path.join(SHARED, "stsb", "sts-train.csv"), encoding="utf-8") as f:
            sts = [r[c] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 7 for c in (5, 6)]
        sents = random.Random(0).sample(sts, n_sts) + sents
    rows = [{"context": t, "instruction": instruction, "output": t} for t in dict.fromkeys(sents)]
    if entailment:
        rows += [{"context": r["query"], "instruction": ENTAIL, "output": r["pos"]} for r in nli]
        random.Random(1).shuffle(rows)
    write_jsonl(path, rows)
    return path


def stage2_file(path: str, n_rows: int, instruction: str | None) -> str:
    """The first ``n_rows`` NLI triplets: what (b) and (d)-(f) train on.  ``instruction`` replaces
    each row's own with the one the evaluation uses (the authors train stage 2 with the prompt they
    evaluate with); None keeps the rows' own."""
    rows = _nli_rows()[:n_rows]
    write_jsonl(path, [{**r, "instruction": instruction or r["instruction"]} for r in rows])
    return path


CROP = (0.1, 0.5)  # Contriever's independent cropping: each view keeps 10-50% of the text's words,
MIN_CROP = 5  # but 5 at least (all of a shorter text): a one-word view of an NLI sentence says nothing


def crop_pairs_file(path: str, stage1_rows: str, n_rows: int, seed: int, instruction: str = INSTRUCTION) -> str:
    """Unsupervised contrastive rows from stage 1's raw text (arm (g)): two independent random crops of
    one text as query and positive, a crop of another text as the hard negative (stage 2's rows need
    one; the other rows' documents are the in-batch negatives).  Crops stand in for SimCSE's dropout
    positive because SmolLM2 has no dropout.  ``n_rows`` rows, texts drawn in a ``seed``-shuffled cycle."""
    texts = [r["output"] for r in load_rows(stage1_rows, stage=1)]
    if len(texts) < 2:
        raise SystemExit(f"{stage1_rows}: arm (g) needs at least two stage-1 texts, got {len(texts)}")
    rng = random.Random(seed)
    order = []
    while len(order) < n_rows:
        order += rng.sample(range(len(texts)), len(texts))
    rows = []
    for i in order[:n_rows]:
        other = rng.randrange(len(texts) - 1)
        other += other >= i  # any text but i
        rows.append({"query": crop(texts[i], rng), "pos": crop(texts[i], rng), "neg": [crop(texts[other], rng)],
                     "instruction": instruction})
    write_jsonl(path, rows)
    return path


def crop(text: str, rng: random.Random) -> str:
    """A contiguous span of ``text``'s words, its length a uniform share of them in ``CROP`` (``MIN_CROP``
    words at least, every word of a shorter text)."""
    words = text.split()
    lo, hi = (min(len(words), max(MIN_CROP, round(f * len(words)))) for f in CROP)
    n = rng.randint(lo, hi)
    start = rng.randint(0, len(words) - n)
    return " ".join(words[start : start + n])


def dev_halves(out_dir: str) -> dict:
    """STS-B dev split in two by a fixed seeded permutation: {"tune": half A, "report": half B}."""
    lines = [line for line in read_lines(os.path.join(SHARED, "stsb", "sts-dev.csv")) if line.strip()]
    order = random.Random(20261126).sample(range(len(lines)), len(lines))
    half = len(lines) // 2
    out = {}
    for name, idx in (("tune", order[:half]), ("report", order[half:])):
        out[name] = os.path.join(out_dir, f"sts-dev-{name}.csv")
        with open(out[name], "w", encoding="utf-8") as f:
            f.write("".join(lines[i] + "\n" for i in sorted(idx)))
    return out
