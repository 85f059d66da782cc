"""bench/quality.py's points (one arm at one seed): which ones a run has left, a process each side by
side (``--jobs``), and its scratch folder under a run lock.

Why apart: process fan-out and the lock are bookkeeping that must not fail silently (a failed job
stops the others and names its log), and they are tested without training anything.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from harness import ROOT  # bench/harness.py, beside this script

from autoregembed.run.runlock import RunLock

QUALITY = os.path.join(ROOT, "bench", "quality.py")  # each job's command


class Job(NamedTuple):
    """One bench/quality.py process: its name in messages, its command line, its --out (the log is
    ``<out>.log``) and the name of a job it starts after (the one that trains or reads their stage 1)."""
    name: str
    argv: list[str]
    out: str
    after: str | None = None


STAGE1_ARMS = "cdef"  # the arms that read their seed's stage 1


def points_left(arms: str, seeds: list[int], done: set[tuple[str, str]]) -> dict:
    """seed -> the letters of ``arms`` not in ``done`` ((letter, seed) pairs, quality_record.measured)
    for that seed, and None -> "a" while arm (a), which has no seed, is not; seeds with nothing left
    are left out."""
    plan = {None: "a"} if "a" in arms and ("a", "None") not in done else {}
    for seed in seeds:
        letters = "".join(x for x in dict.fromkeys(arms) if x != "a" and (x, str(seed)) not in done)
        if letters:
            plan[seed] = letters
    return plan


def plan_jobs(plan: dict, argv: list[str], out: str) -> list[Job]:
    """A process per point of ``plan`` (points_left's).  A seed's first stage-1 arm trains its stage 1 or
    reads it from the cache, and the seed's other stage-1 arms start after it; then the longer arms
    first and (a) last, so that processes side by side leave few cores idle."""
    jobs = []
    for seed, letters in plan.items():
        if seed is None:
            continue
        first = next((x for x in STAGE1_ARMS if x in letters), None)
        order = [first] * (first is not None) + [x for x in "bgefd" if x in letters and x != first]
        order += [x for x in letters if x not in order]
        for x in order:
            o = os.path.join(out, f"job-{x}-seed{seed}")
            after = f"({first}) seed {seed}" if x in STAGE1_ARMS and x != first else None
            jobs.append(Job(f"({x}) seed {seed}", job_argv(argv, seed, x, o), o, after))
    if None in plan:
        o = os.path.join(out, "job-a")
        jobs.append(Job("(a)", job_argv(argv, "", "a", o), o))
    return jobs


def job_argv(argv: list[str], seed: int | str, arms: str, out: str) -> list[str]:
    """The command line of one ``--jobs`` child: the user's options less --seeds, --arms, --out and
    --jobs (either spelling, ``--opt v`` or ``--opt=v``), then the child's own."""
    drop, kept, skip = {"--seeds", "--jobs", "--out", "--arms"}, [], False
    for a in argv:
        if skip or a.split("=")[0] in drop:
            skip = not skip and "=" not in a
            continue
        kept.append(a)
    return [*kept, "--seeds", str(seed), "--arms", arms, "--out", out, "--job-of-jobs"]


def run_apart(jobs: list[Job], parallel: int, results: str, split: str) -> list[str]:
    """Each job in its own process, in order once its ``after`` job has finished, at most ``parallel`` at a
    time with cores / parallel threads each; returns the records they wrote under ``results``.  A failed
    job stops the others and names its log: a half-run table must not look finished."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))}
    pending, running, records, finished = list(jobs), [], [], set()
    try:
        while pending or running:
            ready = [j for j in pending if j.after is None or j.after in finished]
            if pending and not ready and not running:
                sys.exit(f"[quality] {pending[0].name} waits for {pending[0].after}, which is not among the jobs")
            for job in ready[: parallel - len(running)]:
                pending.remove(job)
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
                finished.add(name)
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


def series_parser(doc: str, out: str, writes: str) -> argparse.ArgumentParser:
    """The options of a series of report tables run through bench/quality.py (learning_curve.py,
    domain_adaptation.py); ``out``: its scratch folder under runs/, ``writes``: what it writes beside the
    records."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--jobs", type=int, default=1, help="bench/quality.py --jobs: points side by side")
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"),
                    help=f"bench/quality.py's results folder: the records (quality_runs/) and {writes}")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", out))
    return ap


def run_table(label: str, options: list[str], args, out: str, extra: list[str]):
    """One table of a series: bench/quality.py with ``options`` at ``args.seeds``, ``args.jobs`` points side by
    side, its records in ``args.results`` (so it runs only the points no record holds); ``extra``: the
    series' own command line's other options, passed through."""
    cmd = [sys.executable, QUALITY, *options, "--seeds", args.seeds, "--jobs", str(args.jobs),
           "--results", args.results, "--out", out, *extra]
    print(f"[{label}] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
