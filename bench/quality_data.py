"""What bench/quality.py's arms train and are scored on: stage-1 rows, the NLI triplets, STS-B dev's two
halves, and the fixed prompts and k every arm shares.

Why apart: the data decide which claim a table supports (no STS-B text in stage 1 by default; the
report half unseen while tuning), so they are read in one place, away from the training loop.
"""
from __future__ import annotations

import csv
import os
import random

from harness import ROOT  # bench/harness.py, beside this script

from autoregembed.ground.data import load_rows, read_lines, write_jsonl

SHARED = os.path.join(ROOT, "..", "shared", "data")
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
        sents = list(documents) + sents
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
