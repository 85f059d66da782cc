"""Stage 1 as unsupervised domain adaptation: does autoencoding a collection's own documents (no queries,
no judgments) before stage 2 raise nDCG@10 on that collection, and more than the contrastive recipe
given the same raw text?

Two runs of bench/quality.py on the report split, whose records pool with every other of this package
code: the benchmark's defaults (arms b, c, d: stage 1 on the NLI sentences; the report table's) and
``--stage1-corpus general+ir`` (arms c, d, g: stage 1 also autoencodes Cranfield's and CISI's documents,
and (g) is (b) after InfoNCE on crops of that same text).  The table sets each adapted arm beside its
unadapted twin, per collection and on STS (what adaptation costs elsewhere), with the gains paired by
seed (the same seed's two models differ only in the raw text), and stage 1's information gap at its last
step (the signal the score should follow; on each run's own probe rows, so the adapted run's include
documents: ``autoregembed reconstruct`` measures both models on the same documents).  ``--table-only`` trains nothing.  Writes
bench/results/domain_adaptation.{json,md}.

    python bench/domain_adaptation.py --seeds 42,1,2 --jobs 2   # hours on 2 cores; reuses the table's runs
    python bench/domain_adaptation.py --table-only              # the records kept so far
"""
from __future__ import annotations

import json
import os
import sys

from harness import data_digest, package_code_digest  # bench/harness.py, beside this script
from quality import records_for
from quality_jobs import run_table, series_parser
from quality_record import ARM_NAMES, _mean_std, merge_records

from autoregembed.ground.atomic import atomic_write_text
from autoregembed.ground.errors import reporting_user_errors

RUNS = {"plain": (["--split", "report"], "bcd"),  # the report table's settings
        "adapted": (["--split", "report", "--stage1-corpus", "general+ir"], "cdg")}
B, C, D, G = (ARM_NAMES[x][0] for x in "bcdg")
BM25 = ARM_NAMES["a"][2]
ROWS = [  # (label, run, arm name)
    ("BM25 (lexical floor)", "plain", BM25),
    ("(b) InfoNCE on the NLI triplets", "plain", B),
    ("(g) InfoNCE on crops of the documents, then (b)", "adapted", G),
    ("(c) stage 1 on NLI sentences", "plain", C),
    ("(c) stage 1 on NLI sentences + the documents", "adapted", C),
    ("(d) (c) + stage 2", "plain", D),
    ("(d) adapted (c) + stage 2", "adapted", D),
]
GAINS = [  # (label, minuend row, subtrahend row): paired by seed
    ("stage 1 on the documents: adapted (d) - (d)", ("adapted", D), ("plain", D)),
    ("stage 1 on the documents: adapted (c) - (c)", ("adapted", C), ("plain", C)),
    ("InfoNCE on the documents: (g) - (b)", ("adapted", G), ("plain", B)),
    ("the two adaptations: adapted (d) - (g)", ("adapted", D), ("adapted", G)),
]


def pooled(results: str, options: list[str], code: str, data: str | None) -> dict | None:
    """The merged record of every record in ``results`` bench/quality.py would pool with a run of
    ``options`` (``quality.records_for``); None if none."""
    paths = records_for(options, results, code, data)
    return merge_records(paths) if paths else None


def columns(record: dict | None, name: str) -> dict[str, dict[str, float]]:
    """metric -> {seed: value} of arm ``name`` in ``record``: "sts" (Spearman x100) and "ndcg@10 <collection>"
    for each collection and their mean; empty where not measured."""
    if record is None:
        return {}
    out = {"sts": record["spearman_x100"].get(name, {}).get("per_seed", {})}
    for c, arms in record.get("retrieval", {}).get("ndcg@10", {}).items():
        out[f"ndcg@10 {c}"] = arms.get(name, {}).get("per_seed", {})
    return {k: v for k, v in out.items() if v}


def _stat(values: list[float], digits: int) -> dict:
    mean, std = _mean_std(values)
    return {"mean": round(mean, digits), "std": round(std, digits), "n": len(values)}


def table(records: dict[str, dict | None]) -> dict:
    """{"rows": {label: {metric: {mean, std, n, per_seed}}}, "gains": {label: {metric: {mean, std, n}}},
    "info_gap": {run: {seed: nats per token}}}; a gain pairs the seeds both of its rows hold."""
    rows = {}
    for label, run, name in ROWS:
        cols = columns(records[run], name)
        if cols:  # e.g. BM25 where the records hold no retrieval
            rows[label] = {m: {**_stat(list(v.values()), 2 if m == "sts" else 4), "per_seed": v}
                           for m, v in cols.items()}
    gains = {}
    for label, (run_a, a), (run_b, b) in GAINS:
        one, two = columns(records[run_a], a), columns(records[run_b], b)
        for metric in one.keys() & two.keys():
            seeds = [s for s in one[metric] if s in two[metric]]
            if seeds:
                digits = 2 if metric == "sts" else 4
                diffs = [round(one[metric][s] - two[metric][s], digits) for s in seeds]
                gains.setdefault(label, {})[metric] = {**_stat(diffs, digits), "per_seed": dict(zip(seeds, diffs))}
    gaps = {run: {k.removeprefix("stage1 seed "): g["nats_per_token"] for k, g in (r or {}).get("info_gap", {}).items()}
            for run, r in records.items()}
    return {"rows": rows, "gains": gains, "info_gap": gaps}


def markdown(t: dict) -> str:
    """The table as Markdown: a row per arm and per paired gain, nDCG@10 per collection and mean, then STS."""
    found = dict.fromkeys(m for r in [*t["rows"].values(), *t["gains"].values()] for m in r if m != "sts")
    metrics = sorted(found, key=lambda m: m == "ndcg@10 mean") + ["sts"]  # the collections in the records' order

    def cell(v, metric, signed):
        if not v:
            return "—"
        digits = 2 if metric == "sts" else 4
        return f"{v['mean']:{'+' if signed else ''}.{digits}f} ± {v['std']:.{digits}f} (n={v['n']})"

    head = ["arm", *(m.replace("ndcg@10 ", "nDCG@10 ") if m != "sts" else "STS-B x100" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for part in ("rows", "gains"):
        for label, cols in t[part].items():
            lines.append("| " + " | ".join([label, *(cell(cols.get(m), m, part == "gains") for m in metrics)]) + " |")
    gaps = "; ".join(f"{run}: " + ", ".join(f"seed {s} {g:.3f}" for s, g in by_seed.items())
                     for run, by_seed in t["info_gap"].items() if by_seed)
    tail = (f"\n\nStage 1's information gap at its last step, on its own probe rows (the adapted run's are "
            f"documents too), nats/token: {gaps}") if gaps else ""
    return "\n".join(lines) + tail + "\n"


def main():
    ap = series_parser(__doc__, "domain_adaptation", "domain_adaptation.{json,md}")
    ap.add_argument("--table-only", action="store_true", help="train nothing: the table of the records kept")
    args, extra = ap.parse_known_args()  # the rest goes to bench/quality.py (e.g. --base, --stage1-steps)
    for run, (options, arms) in [] if args.table_only else RUNS.items():
        run_table(f"domain_adaptation {run}", [*options, "--arms", arms], args, os.path.join(args.out, run), extra)
    code = package_code_digest()
    data = data_digest()
    records = {run: pooled(args.results, options + extra, code, data) for run, (options, _) in RUNS.items()}
    if records["adapted"] is None:
        sys.exit(f"no report records with --stage1-corpus general+ir and package code {code} in "
                 f"{args.results}/quality_runs")
    t = table(records)
    text = markdown(t)
    print(text)
    atomic_write_text(os.path.join(args.results, "domain_adaptation.json"),
                      json.dumps({"package_code": code, **t}, indent=2))
    atomic_write_text(os.path.join(args.results, "domain_adaptation.md"), text)
    print(f"wrote {args.results}/domain_adaptation.json and domain_adaptation.md")


if __name__ == "__main__":
    sys.exit(reporting_user_errors(main, "domain_adaptation.py"))
