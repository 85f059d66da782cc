"""Learning efficiency: InfoNCE (b) and AutoRegEmbed (d) of bench/quality.py at growing numbers of
labelled triplets, on the report half of STS-B dev and the report collections; where does (b) at 2N
reach (d) at N?

Every point is one arm at one size N and one seed: ``bench/quality.py --split report --arms b|d
--nli-rows N --seeds S``, with as many stage-2 optimizer steps per triplet at every size
(``--stage2-steps N * 30 / 240``; (b) keeps its own rule: stage 1's steps plus stage 2's), the other
settings at the benchmark's defaults (other bench/quality.py options pass through), ``--jobs`` points
side by side with cores / jobs threads each.  Stage 1 reads no triplet: its cache trains it once per
seed for all sizes.  A point counts once a record holds its STS and retrieval, in ``--results``'s
quality_runs (this curve's own runs) or ``--table``'s (the report table's runs: at 240 triplets and
30 steps its (b) and (d) are this curve's), at this checkout's package code and the settings this
curve would run; a counted point is not run again, so the curve grows over several sessions, and
records of other code or settings are left out (their number printed).  ``--plot-only`` trains
nothing.  The curve: ``--results``/curve.{json,png} (mean ± std over seeds per size and arm).

    python bench/learning_curve.py --seeds 42,1,2 --sizes 120,240,480,960 --jobs 2   # hours on 2 cores
    python bench/learning_curve.py --plot-only                                       # the records kept so far
    python bench/learning_curve.py --sizes 120,240 --seeds 42 --no-retrieval         # a part, STS only
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from harness import ROOT, package_code_digest  # bench/harness.py, beside this script
from quality import parser as quality_parser
from quality_jobs import Job, run_apart
from quality_record import comparable, merge_records

from autoregembed.ground.atomic import atomic_write_text

ARMS = {"b": "(b) contrastive (InfoNCE)", "d": "(d) stage 1 + stage 2"}
STEPS_PER_240 = 30  # bench/quality.py's default: 30 stage-2 steps over its default 240 triplets


def stage2_steps(size: int) -> int:
    return max(1, round(size * STEPS_PER_240 / 240))


def size_options(size: int) -> list[str]:
    return ["--split", "report", "--nli-rows", str(size), "--stage2-steps", str(stage2_steps(size))]


def records_by_size(folders: list[str], sizes: list[int], extra: list[str], code: str) -> dict[int, list[str]]:
    """size -> the report records in ``folders`` (their quality_runs/) of package code ``code`` holding
    arm (b) or (d), trained with the settings this curve runs at that size."""
    want = {n: comparable(vars(quality_parser().parse_args(size_options(n) + extra))) for n in sizes}
    found, other = {n: [] for n in sizes}, 0
    for path in sorted({p for d in folders for p in glob.glob(os.path.join(d, "quality_runs", "report-*.json"))}):
        with open(path) as f:
            r = json.load(f)
        if r["split"] != "report" or not set(r["settings"]["arms"]) & set(ARMS):
            continue
        sizes_of = [n for n, w in want.items() if comparable(r["settings"]) == w]
        if r.get("package_code") != code or not sizes_of:
            other += 1
        for n in sizes_of if r.get("package_code") == code else []:
            found[n].append(path)
    if other:
        print(f"[learning_curve] {other} record(s) of arm (b) or (d) at another package code or settings left out")
    return found


def measured(paths: list[str]) -> set[tuple[str, str]]:
    """(arm letter, seed) of every point these records hold with its STS and, unless their run skipped
    retrieval, its retrieval on every collection (a run stopped mid-retrieval has not measured it)."""
    points = set()
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        by_collection = r.get("retrieval", {}).get("ndcg@10", {})
        for letter, name in ARMS.items():
            for seed in r["spearman_x100"].get(name, {}).get("per_seed", {}):
                if r["settings"].get("no_retrieval") or (by_collection and all(
                        seed in c.get(name, {}).get("per_seed", {}) for c in by_collection.values())):
                    points.add((letter, seed))
    return points


def missing_points(found: dict[int, list[str]], seeds: list[str], args, extra: list[str]) -> list[Job]:
    """The bench/quality.py jobs of the points not yet measured, arm (d)'s first: one seed's (d) runs one
    at a time (the first may train its stage 1, which the later sizes then read from the cache)."""
    jobs = []
    for letter in "db":
        for size, paths in found.items():
            done = measured(paths)
            for seed in seeds:
                if (letter, seed) not in done:
                    out = os.path.join(args.out, f"n{size}-{letter}-seed{seed}")
                    argv = size_options(size) + ["--arms", letter, "--seeds", seed, "--results", args.results,
                                                 "--out", out, "--job-of-jobs", *extra]
                    jobs.append(Job(f"{size} triplets ({letter}) seed {seed}", argv, out,
                                    exclusive=f"stage 1 seed {seed}" if letter == "d" else None))
    return jobs


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
                lines.append(f"{metric}: (b) at {2 * n} = {b['mean']} ± {b['std']} {verdict} (d) at {n} = "
                             f"{d['mean']} ± {d['std']}")
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
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled triplets")
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # e.g. --no-retrieval runs
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="120,240,480,960")
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="points trained side by side, cores / jobs threads each")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "learning_curve"),
                    help="this curve's folder: its runs' records (quality_runs/) and curve.{json,png}")
    ap.add_argument("--table", default=os.path.join(ROOT, "bench", "results"),
                    help="bench/quality.py's results folder: its report records count at their size ('' : none)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "learning_curve"))
    ap.add_argument("--plot-only", action="store_true", help="train nothing: the curve of the records kept")
    args, extra = ap.parse_known_args()  # the rest goes to bench/quality.py (e.g. --base, --stage1-steps)
    if args.jobs < 1:
        sys.exit(f"--jobs must be >= 1, got {args.jobs}")
    sizes = [int(x) for x in args.sizes.split(",")]
    folders = [args.results] + ([args.table] if args.table else [])
    code = package_code_digest()
    found = records_by_size(folders, sizes, extra, code)
    jobs = [] if args.plot_only else missing_points(found, [s.strip() for s in args.seeds.split(",")], args, extra)
    if jobs:
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(os.path.join(args.results, "quality_runs"), exist_ok=True)
        run_apart(jobs, args.jobs, args.results, "report")
        found = records_by_size(folders, sizes, extra, code)
    table = curve(found)
    if not table:
        sys.exit(f"no report records of arms b and d at sizes {args.sizes} in {' or '.join(folders)} (quality_runs/)")
    for n in sorted(table):
        for letter, name in ARMS.items():
            m = table[n][letter]
            cells = [f"{k} {v['mean']} ± {v['std']} ({len(v['per_seed'])} seeds)" for k, v in m.items() if v]
            print(f"  {n:5d} triplets  {name:<28} " + ", ".join(cells))
    lines = crossings(table)
    for line in lines:
        print("  " + line)
    atomic_write_text(os.path.join(args.results, "curve.json"),
                      json.dumps({"package_code": code, "sizes": {str(n): v for n, v in table.items()},
                                  "crossings": lines,
                                  "records": {str(n): [os.path.relpath(p, ROOT) for p in paths]
                                              for n, paths in found.items()}},
                                 indent=2))
    plot(table, os.path.join(args.results, "curve.png"))
    print(f"wrote {args.results}/curve.json and curve.png")


if __name__ == "__main__":
    main()
