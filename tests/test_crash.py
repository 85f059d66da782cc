"""Hard crashes: a SIGKILLed rank, and a kill in the middle of a checkpoint save."""
import json
import os
import signal
import subprocess
import time

import pytest
from helpers import ROOT, TINY_BASE, child_command, child_env, run_child

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("default_tiny_base")]

WORKER = os.path.join(ROOT, "tests", "crash_worker.py")


def _worker(out, *args):
    return [WORKER, out, TINY_BASE["path"], *args]


def _by_step(out):
    """The loss of each step; a resumed run first drops the records logged after its checkpoint,
    so each step appears once, in order."""
    records = [json.loads(line) for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return {r["step"]: r["loss"] for r in records}


def _straight(tmp_path, nproc, steps):
    out = str(tmp_path / f"straight{nproc}")
    r = run_child(_worker(out, steps), ranks=nproc)
    assert r.returncode == 0, r.stderr[-3000:]
    return _by_step(out)


def _worker_pids(out):
    """The ranks' PIDs, from the files crash_worker.py writes at start (``<out>/pids/<rank>``)."""
    folder = os.path.join(out, "pids")
    return [int(open(os.path.join(folder, f)).read()) for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []


def test_sigkilled_rank_resumes_with_identical_losses(tmp_path):
    steps = 20
    want = _straight(tmp_path, 2, steps)
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(child_command(_worker(out, steps), ranks=2), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = os.path.join(out, "stage1", "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 9):
        time.sleep(0.05)
    ranks = _worker_pids(out)
    assert ranks, "no worker processes found"
    os.kill(ranks[-1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # the job died
    died_at = len(open(metrics).readlines())
    assert died_at < steps
    r = run_child(_worker(out, steps), ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _by_step(out)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step


def test_kill_during_save_leaves_previous_checkpoint_usable(tmp_path):
    out = str(tmp_path / "crash")
    r = run_child(_worker(out, 8, 4), ranks=1)
    assert r.returncode != 0  # killed inside the step-4 save
    ckpt = os.path.join(out, "stage1", "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read() == "step00000002"
    assert os.path.isdir(os.path.join(ckpt, "step00000004.partial"))  # the torn save, never pointed at
    r = run_child(_worker(out, 8), ranks=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded checkpoint" in r.stdout + r.stderr and "step00000002 (step 2)" in r.stdout + r.stderr
    got = _by_step(out)
    want = _straight(tmp_path, 1, 8)
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), step
    assert not os.path.exists(os.path.join(ckpt, "step00000004.partial"))  # cleaned by the next save


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    """Universal-checkpoint conversion; same global batch (accumulation doubled) -> same trajectory."""
    want = _straight(tmp_path, 2, 8)
    out = str(tmp_path / "shrink")
    r = run_child(_worker(out, 8, 6), ranks=2)
    assert r.returncode != 0  # died while saving step 6: step 4 is the latest complete checkpoint
    ckpt = os.path.join(out, "stage1", "checkpoints")
    assert open(os.path.join(ckpt, "latest")).read() == "step00000004"
    wrong = run_child(_worker(out, 8), ranks=1)
    assert wrong.returncode != 0 and "set gradient_accumulation_steps" in wrong.stderr + wrong.stdout
    r = run_child(_worker(out, 8, "-", "stage1.gradient_accumulation_steps=2"), ranks=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isdir(os.path.join(ckpt, "universal", "step00000004"))
    said = f"{ckpt}/step00000004 was saved by 2 rank(s) and is loaded on 1: through DeepSpeed's universal format, "
    assert f"{said}converting it now into {ckpt}/universal/step00000004" in wrong.stdout  # the first 1-rank run
    assert f"{said}converted before into {ckpt}/universal/step00000004" in r.stdout
    got = _by_step(out)
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])
