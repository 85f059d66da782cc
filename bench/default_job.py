"""The default job (``python train.py``: the tiny model on the bundled data) across seeds: does its
stage 1 compress, and do its models beat the untrained base they start from?

Per seed, the job runs as a user runs it (``--set seed=S``, its own output folder, its own tiny base)
and the record takes: the information gap at stage 1's last step (nats/token, the signal that says
whether the compressed tokens carry their own text), the untrained base's STS read as the export
reads text (the floor, eval.compare_base), and the STS of the stage-1 and stage-2 exports, each as
mean ± standard deviation over the seeds.  ``--set`` options reach every job, to compare a setting.

    python bench/default_job.py --seeds 42,1,2 --jobs 2            # ~3 min on 2 cores
    python bench/default_job.py --seeds 42,1,2 --set loss.stage1_contrast=1
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

from autoregembed.runtime.atomic import atomic_write_text  # noqa: E402


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
    stage1 = json_child([sys.executable, "-m", "autoregembed.tools.cli", "eval", "--model",
                         os.path.join(run, "stage1", "model"), "--sts", result["sts"]], env)
    with open(os.path.join(run, "stage1", "metrics.jsonl")) as f:
        gap = [json.loads(line)["info_gap"] for line in f if '"info_gap"' in line][-1]
    return {"seed": seed, "info_gap": round(gap, 4), "base": result["base_spearman_x100"],
            "stage1": stage1["spearman_x100"],
            "stage2": result["spearman_x100"], "sts": result["sts"]}


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("info_gap", "base", "stage1", "stage2"):
        values = [r[key] for r in rows]
        out[key] = {"mean": round(statistics.fmean(values), 3),
                    "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0}
    for stage in ("stage1", "stage2"):
        out[f"{stage}_minus_base"] = sorted(round(r[stage] - r["base"], 2) for r in rows)
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
        print(f"seed {r['seed']}: information gap {r['info_gap']:.3f} nats/token; STS untrained base {r['base']:.2f}, "
              f"stage 1 {r['stage1']:.2f}, stage 2 {r['stage2']:.2f}")
    record = {**record_header(), "command": " ".join(sys.argv), "settings": args.sets, "per_seed": rows,
              "summary": summary(rows)}
    print(json.dumps(record["summary"]))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    atomic_write_text(args.results, json.dumps(record, indent=2) + "\n")  # a kill never leaves half a record


if __name__ == "__main__":
    main()
