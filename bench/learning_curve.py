"""Learning efficiency: InfoNCE (b) and AutoRegEmbed (d) of bench/quality.py at growing numbers of
labelled triplets, on the report half of STS-B dev and the report collections; where does (b) at 2N
reach (d) at N?

Every size N is ``bench/quality.py --split report --arms bd --nli-rows N --stage2-steps N*30/240
--seeds ... --jobs ...`` (as many stage-2 optimizer steps per triplet at every size; (b) keeps its own
rule: stage 1's steps plus stage 2's; the other settings at the benchmark's defaults, other
bench/quality.py options passed through).  Its records go where the report table's do, so the table's
(b) and (d) are the curve's 240 and bench/quality.py runs only the points no record of this package
code holds: the curve grows over several sessions, and stage 1, which reads no triplet, comes from its
cache once per seed.  ``--plot-only`` trains nothing.  The curve: bench/results/learning_curve.{json,png}
(mean ± std over seeds per size and arm).

    python bench/learning_curve.py --seeds 42,1,2 --sizes 120,240,480,960 --jobs 2   # hours on 2 cores
    python bench/learning_curve.py --plot-only                                       # the records kept so far
    python bench/learning_curve.py --sizes 120,240 --seeds 42 --no-retrieval         # a part, STS only
"""
from __future__ import annotations

import json
import os
import sys

from harness import ROOT, data_digest, package_code_digest  # bench/harness.py, beside this script
from quality import records_for
from quality_jobs import run_table, series_parser
from quality_record import merge_records

from autoregembed.ground.atomic import atomic_write_text
from autoregembed.ground.errors import reporting_user_errors

ARMS = {"b": "(b) contrastive (InfoNCE)", "d": "(d) stage 1 + stage 2"}
STEPS_PER_240 = 30  # bench/quality.py's default: 30 stage-2 steps over its default 240 triplets


def stage2_steps(size: int) -> int:
    return max(1, round(size * STEPS_PER_240 / 240))


def size_options(size: int) -> list[str]:
    return ["--split", "report", "--nli-rows", str(size), "--stage2-steps", str(stage2_steps(size))]


def records_by_size(results: str, sizes: list[int], extra: list[str], code: str,
                    data: str | None) -> dict[int, list[str]]:
    """size -> the report records in ``results`` of package code ``code`` and data ``data`` with the settings
    this curve runs at that size (bench/quality.py's own rule for which records pool)."""
    return {n: records_for(size_options(n) + extra, results, code, data) for n in sizes}


def curve(by_size: dict[int, list[str]]) -> dict:
    """size -> arm -> {metric: {mean, std, per_seed}}, metric sts (Spearman x100) and ndcg@10 (the
    report collections' mean)."""
    out = {}
    for size, paths in by_size.items():
        if not paths:
            continue
        merged = merge_records(paths)
        ir = merged.get("retrieval", {}).get("ndcg@10", {}).get("mean", {})
        out[size] = {letter: {"sts": merged["spearman_x100"].get(name), "ndcg@10": ir.get(name)}
                     for letter, name in ARMS.items()}
    return out


def _pooled(v: dict) -> str:
    """mean ± std and over how many seeds: a std of one seed is 0 and says nothing of the spread."""
    return f"{v['mean']} ± {v['std']} ({len(v['per_seed'])} seed{'s' if len(v['per_seed']) > 1 else ''})"


def crossings(table: dict) -> list[str]:
    """Per size N with a size 2N: (b) at 2N against (d) at N, on each metric."""
    lines = []
    for n in sorted(table):
        if 2 * n not in table:
            continue
        for metric in ("sts", "ndcg@10"):
            d, b = table[n]["d"][metric], table[2 * n]["b"][metric]
            if d and b:
                verdict = "reaches" if b["mean"] >= d["mean"] else "stays below"
                lines.append(f"{metric}: (b) at {2 * n} = {_pooled(b)} {verdict} (d) at {n} = {_pooled(d)}")
    return lines


def plot(table: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in zip(axes, ("sts", "ndcg@10"), ("STS-B dev report half, Spearman x100",
                                                             "nDCG@10, mean of Cranfield and CISI")):
        for letter, name in ARMS.items():
            sizes = [n for n in sorted(table) if table[n][letter][metric]]
            if sizes:
                mean = [table[n][letter][metric]["mean"] for n in sizes]
                std = [table[n][letter][metric]["std"] for n in sizes]
                ax.errorbar(sizes, mean, yerr=std, marker="o", capsize=3, label=name)
                for n, y in zip(sizes, mean):  # a point of fewer seeds has no spread to draw: say how many
                    ax.annotate(f"n={len(table[n][letter][metric]['per_seed'])}", (n, y), xytext=(4, 4),
                                textcoords="offset points", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.margins(x=0.1)  # room for the seed counts beside the last point
        ax.set_xticks(sorted(table), [str(n) for n in sorted(table)])  # the measured sizes, not powers of 2
        ax.minorticks_off()
        ax.set_xlabel("labelled triplets")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. --no-retrieval runs
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = series_parser(__doc__, "learning_curve", "learning_curve.{json,png}")
    ap.add_argument("--sizes", default="120,240,480,960")
    ap.add_argument("--plot-only", action="store_true", help="train nothing: the curve of the records kept")
    args, extra = ap.parse_known_args()  # the rest goes to bench/quality.py (e.g. --base, --stage1-steps)
    sizes = [int(x) for x in args.sizes.split(",")]
    for size in [] if args.plot_only else sizes:
        run_table(f"learning_curve {size} triplets", [*size_options(size), "--arms", "bd"], args,
                  os.path.join(args.out, f"n{size}"), extra)
    code = package_code_digest()
    found = records_by_size(args.results, sizes, extra, code, data_digest())
    table = curve(found)
    if not table:
        sys.exit(f"no report records of arms b and d at sizes {args.sizes} and package code {code} "
                 f"in {args.results}/quality_runs")
    for n in sorted(table):
        for letter, name in ARMS.items():
            m = table[n][letter]
            cells = [f"{k} {_pooled(v)}" for k, v in m.items() if v]
            print(f"  {n:5d} triplets  {name:<28} " + (", ".join(cells) or "not measured"))
    lines = crossings(table)
    for line in lines:
        print("  " + line)
    atomic_write_text(os.path.join(args.results, "learning_curve.json"),
                      json.dumps({"package_code": code, "sizes": {str(n): v for n, v in table.items()},
                                  "crossings": lines,
                                  "records": {str(n): [os.path.relpath(p, ROOT) for p in paths]
                                              for n, paths in found.items()}},
                                 indent=2))
    plot(table, os.path.join(args.results, "learning_curve.png"))
    print(f"wrote {args.results}/learning_curve.json and learning_curve.png")


if __name__ == "__main__":
    sys.exit(reporting_user_errors(main, "learning_curve.py"))
