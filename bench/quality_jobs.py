"""bench/quality.py's seeds side by side (``--jobs``), and its scratch folder under a run lock.

Why apart: process fan-out and the lock are bookkeeping that must not fail silently (a failed seed
stops the others and names its log), and they are tested without training anything.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import time

from autoregembed.run.runlock import RunLock

QUALITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality.py")  # each seed's command


def job_argv(argv: list[str], seed: int, arms: str, out: str) -> list[str]:
    """The command line of one ``--jobs`` child: the user's options less --seeds, --arms, --out and
    --jobs (either spelling, ``--opt v`` or ``--opt=v``), then the child's own."""
    drop, kept, skip = {"--seeds", "--jobs", "--out", "--arms"}, [], False
    for a in argv:
        if skip or a.split("=")[0] in drop:
            skip = not skip and "=" not in a
            continue
        kept.append(a)
    return [*kept, "--seeds", str(seed), "--arms", arms, "--out", out, "--job-of-jobs"]


def run_seeds_apart(args, seeds: list[int], argv: list[str]) -> list[str]:
    """``--jobs``: bench/quality.py once per seed, each in its own process (arm (a), which has no seed, in
    the first only), at most ``args.jobs`` at a time with cores / jobs threads each; returns their records
    for ``merge_records``.  Why: seeds are independent runs, so the report's three need not take three
    times one seed's wall time (docs/benchmarks.md has the cost)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    pending, running, records = list(enumerate(seeds)), [], []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                i, seed = pending.pop(0)
                arms = args.arms if i == 0 else args.arms.replace("a", "")
                out = os.path.join(args.out, f"job-seed{seed}")
                log = open(out + ".log", "w")
                cmd = [sys.executable, QUALITY, *job_argv(argv, seed, arms, out)]
                running.append((seed, log, time.time(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                                         env=env)))
                print(f"[quality] seed {seed}: {' '.join(cmd[1:])} (log {log.name})", flush=True)
            time.sleep(1)
            for job in [j for j in running if j[-1].poll() is not None]:
                seed, log, started, proc = job
                running.remove(job)
                log.close()
                if proc.returncode:
                    sys.exit(f"[quality] seed {seed} failed (exit {proc.returncode}): see {log.name}")
                found = [p for p in glob.glob(os.path.join(args.results, "quality_runs", f"{args.split}-*-{proc.pid}.json"))
                         if os.path.getmtime(p) >= started - 1]  # not an older run's record under a reused pid
                if not found:
                    sys.exit(f"[quality] seed {seed} wrote no record: see {log.name}")
                records.append(max(found, key=os.path.getmtime))
                print(f"[quality] seed {seed} done: {records[-1]}", flush=True)
    finally:  # a failed seed or an interrupt (Ctrl-C) stops the other seeds too, instead of leaving them running
        for *_, proc in running:
            proc.terminate()
    return records


def fresh_scratch(out: str) -> RunLock:
    """Empty the benchmark's scratch folder for a fresh run, under its run lock: a second run given the
    same ``--out`` is refused instead of deleting the models the first is training and scoring."""
    lock = RunLock(out).acquire()
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if path == lock.path:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    return lock
