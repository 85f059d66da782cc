"""bench/quality.py runs side by side (its seeds under ``--jobs``, the learning curve's points), and its scratch
folder under a run lock.

Why apart: process fan-out and the lock are bookkeeping that must not fail silently (a failed seed
stops the others and names its log), and they are tested without training anything.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from typing import NamedTuple

from autoregembed.run.runlock import RunLock

QUALITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality.py")  # each seed's command


class Job(NamedTuple):
    """One bench/quality.py process: its name in messages, its command line, its --out (the log is
    ``<out>.log``) and ``exclusive``: jobs with the same value never run at the same time (two runs that
    would train the same uncached stage 1 train it once, the later one reads the cache)."""
    name: str
    argv: list[str]
    out: str
    exclusive: str | None = None


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
    the first only); returns their records for ``merge_records``.  Why: seeds are independent runs, so
    the report's three need not take three times one seed's wall time (docs/benchmarks.md has the cost)."""
    jobs = []
    for i, seed in enumerate(seeds):
        out = os.path.join(args.out, f"job-seed{seed}")
        arms = args.arms if i == 0 else args.arms.replace("a", "")
        jobs.append(Job(f"seed {seed}", job_argv(argv, seed, arms, out), out))
    return run_apart(jobs, args.jobs, args.results, args.split)


def run_apart(jobs: list[Job], parallel: int, results: str, split: str) -> list[str]:
    """Each job in its own process, in order as far as ``Job.exclusive`` allows, at most ``parallel`` at a
    time with cores / parallel threads each; returns the records they wrote under ``results``.  A failed
    job stops the others and names its log: a half-run table must not look finished."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    pending, running, records = list(jobs), [], []
    try:
        while pending or running:
            busy = {j.exclusive for j, *_ in running}
            for job in list(pending):
                if len(running) == parallel or (job.exclusive is not None and job.exclusive in busy):
                    continue
                pending.remove(job)
                busy.add(job.exclusive)
                log = open(job.out + ".log", "w")
                cmd = [sys.executable, QUALITY, *job.argv]
                running.append((job, log, time.time(), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                                        env=env)))
                print(f"[quality] {job.name}: {' '.join(cmd[1:])} (log {log.name})", flush=True)
            time.sleep(1)
            for entry in [j for j in running if j[-1].poll() is not None]:
                (name, *_), log, started, proc = entry
                running.remove(entry)
                log.close()
                if proc.returncode:
                    sys.exit(f"[quality] {name} failed (exit {proc.returncode}): see {log.name}")
                found = [p for p in glob.glob(os.path.join(results, "quality_runs", f"{split}-*-{proc.pid}.json"))
                         if os.path.getmtime(p) >= started - 1]  # not an older run's record under a reused pid
                if not found:
                    sys.exit(f"[quality] {name} wrote no record: see {log.name}")
                records.append(max(found, key=os.path.getmtime))
                print(f"[quality] {name} done: {records[-1]}", flush=True)
    finally:  # a failed job or an interrupt (Ctrl-C) stops the others too, instead of leaving them running
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
