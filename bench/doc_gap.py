"""How much of a collection's documents stage 1's compressed tokens hold: the information gap and token
accuracy (``autoregembed reconstruct``) of stage-1 exports on documents of the retrieval collections,
beside stage 1's own training texts, mean ± std over the exports (one per seed).

Why: the gap stage 1 logs is on its training sentences (~14 words); retrieval encodes abstracts ten times
longer, and what the k tokens keep of a document is the signal that explains an arm's nDCG@10 and what
stage 1 on the collection's own documents (domain_adaptation.py) changes.  Every text is cut to what the
export's encoder reads (its ``max_text_len``), the gap is each text's own e against the mean e of its set.

    python bench/doc_gap.py --models runs/stage1-cache/seed*-<key>/model --out bench/results/doc_gap-plain.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile

from harness import ROOT  # bench/harness.py, beside this script
from quality_data import AUTOENCODE, stage1_file
from quality_retrieval import collections

from autoregembed.ground.atomic import atomic_write_text
from autoregembed.ground.data import load_rows
from autoregembed.ground.errors import reporting_user_errors
from autoregembed.release.meta import META_FILE

METRICS = ("info_gap", "info_gap_text", "token_accuracy")


def sample_texts(split: str, n: int, seed: int = 0) -> dict[str, list[str]]:
    """{set name: n texts}: each of the split's collections' documents (non-empty, as retrieval reads
    them) and stage 1's own texts (bench/quality.py's "general" corpus), drawn with ``seed``."""
    sets = {name: [t for t in data.corpus.values() if t.strip()] for name, data in collections(split).items()}
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_rows(stage1_file(os.path.join(tmp, "stage1.jsonl"), "general", False), stage=1)
    sets["stage1"] = [r["context"] for r in rows]
    return {name: random.Random(seed).sample(texts, min(n, len(texts))) for name, texts in sets.items()}


def measure(model: str, texts: dict[str, list[str]], instruction: str, decoder: str | None = None) -> dict[str, dict]:
    """{set name: reconstruct's summary} of one stage-1 export."""
    from autoregembed.release.reconstruct import ExportReconstructor, summary

    export = ExportReconstructor(model, decoder)
    return {name: summary(export(t, instruction, max_new_tokens=1)) for name, t in texts.items()}


def table(per_model: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """{set name: {metric: {mean, std, per_model}}} over the exports."""
    sets = next(iter(per_model.values()))
    out = {}
    for name in sets:
        out[name] = {}
        for m in METRICS:
            values = {model: round(r[name][m], 4) for model, r in per_model.items()}
            spread = statistics.stdev(values.values()) if len(values) > 1 else 0.0
            out[name][m] = {"mean": round(statistics.mean(values.values()), 4), "std": round(spread, 4),
                            "per_model": values}
    return out


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, help="stage-1 export folders (one per seed)")
    ap.add_argument("--split", default="report", choices=("tune", "report"), help="whose collections")
    ap.add_argument("--n", type=int, default=100, help="texts per set")
    ap.add_argument("--instruction", default=AUTOENCODE, help="as stage 1 trained (default: %(default)s)")
    ap.add_argument("--decoder", default=None, help="the frozen base causal LM (default: the exports' base model)")
    ap.add_argument("--out", required=True, help="a JSON file")
    args = ap.parse_args(argv)
    missing = [m for m in args.models if not os.path.isfile(os.path.join(m, META_FILE))]
    if missing:
        sys.exit(f"--models: not an export (no {META_FILE}): {missing[0]}")
    texts = sample_texts(args.split, args.n)
    per_model = {}
    for model in args.models:
        name = os.path.relpath(model, ROOT)
        per_model[name] = measure(model, texts, args.instruction, args.decoder)
        gaps = ", ".join(f"{n} {r['info_gap']:.3f}" for n, r in per_model[name].items())
        print(f"[doc_gap] {name}: information gap {gaps}", flush=True)
    result = {"command": "python bench/doc_gap.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "split": args.split, "texts_per_set": {n: len(t) for n, t in texts.items()},
              "instruction": args.instruction, "sets": table(per_model)}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    for name, row in result["sets"].items():
        print(f"  {name:<10} " + "  ".join(f"{m} {row[m]['mean']:.3f} ± {row[m]['std']:.3f}" for m in METRICS))


if __name__ == "__main__":
    sys.exit(reporting_user_errors(main, "doc_gap.py"))
