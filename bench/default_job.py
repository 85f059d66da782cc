"""The default job (``python train.py``: the tiny model on the bundled data) across seeds: does its
stage 1 compress, and do its models beat the untrained base they start from?

Per seed, the job runs as a user runs it (``--set seed=S``, its own output folder, its own tiny base)
and the record takes: the information gap at stage 1's last step (nats/token, the signal that says
whether the compressed tokens carry their own text), and for the untrained base read as the export
reads text (the floor, eval.compare_base) and the stage-1 and stage-2 exports: retrieval nDCG@10 and
MRR@10 on the held-out bundled pairs (eval.retrieval=auto, the job's own evaluation) and STS, each as
mean ± standard deviation over the seeds.  ``beats_base``: stage 2 above the base on every seed, its
mean margin above the larger seed spread of the two.  ``--set`` options reach every job.

    python bench/default_job.py --seeds 42,1,2 --jobs 2            # ~3 min on 2 cores
    python bench/default_job.py --seeds 42,1,2 --set stage1_loss.contrast=1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from harness import ROOT, json_child, record_header  # bench/harness.py, beside this script

from autoregembed.ground.atomic import atomic_write_text  # noqa: E402


def run_seed(seed: int, sets: list[str], out: str, threads: int) -> dict:
    """One default job, then its stage-1 export scored as the pipeline scores stage 2's."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run = os.path.join(out, f"seed{seed}")
    args = [a for s in [f"seed={seed}", f"output_dir={run}", *sets] for a in ("--set", s)]
    job = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    if job.returncode:
        raise RuntimeError(f"seed {seed}: train.py exited {job.returncode}:\n{job.stderr[-3000:]}")
    with open(os.path.join(run, "eval", "result.json")) as f:
        result = json.load(f)
    stage1_model = os.path.join(run, "stage1", "model")
    stage1 = json_child([sys.executable, "-m", "autoregembed.tools.cli", "eval", "--model", stage1_model,
                         "--sts", result["sts"]], env)
    stage1_ir = json_child([sys.executable, "-m", "autoregembed.tools.cli", "eval", "--model", stage1_model,
                            "--retrieval", result["retrieval"]["set"]], env)["retrieval"]
    with open(os.path.join(run, "stage1", "metrics.jsonl")) as f:
        gap = [json.loads(line)["info_gap"] for line in f if '"info_gap"' in line][-1]
    row = {"seed": seed, "info_gap": round(gap, 4), "sts": result["sts"], "retrieval": result["retrieval"]["set"]}
    for name, sts, ir in (("base", result["base_spearman_x100"], result["base_retrieval"]),
                          ("stage1", stage1["spearman_x100"], stage1_ir),
                          ("stage2", result["spearman_x100"], result["retrieval"])):
        row.update({f"{name}_sts": sts, f"{name}_ndcg10": ir["ndcg@10"], f"{name}_mrr10": ir["mrr@10"]})
    return row


METRICS = ("ndcg10", "mrr10", "sts")


def summary(rows: list[dict]) -> dict:
    def spread(values):
        return statistics.stdev(values) if len(values) > 1 else 0.0

    out = {"info_gap": {"mean": round(statistics.fmean(r["info_gap"] for r in rows), 4),
                        "std": round(spread([r["info_gap"] for r in rows]), 4)}}
    for metric in METRICS:
        for name in ("base", "stage1", "stage2"):
            values = [r[f"{name}_{metric}"] for r in rows]
            out[f"{name}_{metric}"] = {"mean": round(statistics.fmean(values), 4), "std": round(spread(values), 4)}
        diffs = [r[f"stage2_{metric}"] - r[f"base_{metric}"] for r in rows]
        margin = statistics.fmean(diffs)
        out[f"stage2_minus_base_{metric}"] = [round(d, 4) for d in diffs]
        out[f"beats_base_{metric}"] = min(diffs) > 0 and margin > max(out[f"stage2_{metric}"]["std"],
                                                                       out[f"base_{metric}"]["std"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="seeds side by side, the cores shared among them")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary one, removed)")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "default_job.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.abspath(args.out or tmp)  # the jobs run from the checkout's root, wherever this runs
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda s: run_seed(s, args.sets, out, threads), seeds))
    for r in rows:
        print(f"seed {r['seed']}: information gap {r['info_gap']:.3f} nats/token; " + "; ".join(
            f"{metric} base {r[f'base_{metric}']:.4g}, stage 1 {r[f'stage1_{metric}']:.4g}, stage 2 "
            f"{r[f'stage2_{metric}']:.4g}" for metric in METRICS))
    record = {**record_header(), "command": " ".join(sys.argv), "settings": args.sets, "per_seed": rows,
              "summary": summary(rows)}
    print(json.dumps(record["summary"]))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    atomic_write_text(args.results, json.dumps(record, indent=2) + "\n")  # a kill never leaves half a record


if __name__ == "__main__":
    main()
