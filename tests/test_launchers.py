"""Launch paths on real tools: mpirun (Open MPI), and a real two-node Slurm with requeue on preemption."""
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import ROOT, TINY_BASE, child_env, free_port
from local_cluster import LocalSlurm, Unavailable

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("default_tiny_base")]

# The stage scripts ask for whole nodes with 8 GPUs and 64 CPUs; this 2-CPU loopback cluster has no
# GPUs, and its two nodes must hold two jobs at once (--oversubscribe overrides the scripts' --exclusive)
# the loopback nodes have 2 CPUs and 4000 MB each: what every job asks for is overridden to fit (slurm/stage.sh
# asks for 128G, the others for whole nodes)
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe", "--mem=1000M"]


def _tiny():
    return ["--set", f"model.base={TINY_BASE['path']}", "--set", "stage1.micro_batch_size=4",
            "--set", "stage2.micro_batch_size=4"]


def _losses(out, stage):
    return [json.loads(line) for line in open(os.path.join(out, stage, "metrics.jsonl"))]


@pytest.mark.skipif(not shutil.which("mpirun"), reason="Open MPI not installed (scripts/setup_cluster_tools.sh)")
def test_mpirun_two_ranks(tmp_path):
    out = str(tmp_path / "run")
    env = child_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_oob_tcp_if_include="lo",
                    OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_btl="self,vader", MASTER_PORT=str(free_port()))
    cmd = ["mpirun", "-np", "2", "--oversubscribe", "-x", "PATH", "-x", "OMP_NUM_THREADS", "-x", "MASTER_PORT",
           sys.executable, os.path.join(ROOT, "train.py"), "--set", "stage=stage1", "--set", f"output_dir={out}",
           "--set", "stage1.max_steps=2", *_tiny()]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [m["step"] for m in _losses(out, "stage1")] == [1, 2]
    shards = glob.glob(os.path.join(out, "stage1", "checkpoints", "step00000002", "*optim_states.pt"))
    assert len(shards) == 2  # one ZeRO shard per MPI rank: really two ranks


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm"))).start()
    except Unavailable as e:
        pytest.skip(f"no local Slurm: {e}")
    yield cluster
    cluster.stop()


def _submit_env(slurm, extra):
    return {**slurm.env, "AUTOREGEMBED_HOME": ROOT, "PYTHON": sys.executable, "EXTRA_ARGS": " ".join(extra),
            "PYTHONWARNINGS": "ignore", "GPUS_PER_NODE": "1", "DEVICE": "cpu"}


def test_slurm_job_without_gpus_stops_unless_cpu_is_asked_for(slurm, tmp_path):
    env = {k: v for k, v in _submit_env(slurm, []).items() if k not in ("GPUS_PER_NODE", "DEVICE")}
    r = subprocess.run(["sbatch", "--parsable", *CPU_JOB, f"--output={tmp_path}/nogpu-%j.out",
                        os.path.join(ROOT, "slurm", "stage1.sh")], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    states = slurm.wait([job], timeout=120)
    log = open(glob.glob(f"{tmp_path}/nogpu-*.out")[0]).read()
    assert states[job] == "FAILED" and "no GPUs allocated to this job" in log, (states, log)
    # a GPU job without CONFIG would train the tiny test settings on every GPU: refused
    r = subprocess.run(["sbatch", "--parsable", *CPU_JOB, f"--output={tmp_path}/noconfig-%j.out",
                        os.path.join(ROOT, "slurm", "stage1.sh")], env={**env, "GPUS_PER_NODE": "1", "DEVICE": "cuda"},
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    job = r.stdout.strip().split(";")[0]
    states = slurm.wait([job], timeout=120)
    log = open(glob.glob(f"{tmp_path}/noconfig-*.out")[0]).read()
    assert states[job] == "FAILED" and "CONFIG is not set" in log, (states, log)


def test_slurm_pipeline_runs_the_pipelines_stages(slurm, tmp_path):
    out = str(tmp_path / "run")
    extra = ["--set", f"output_dir={out}", "--set", "stage1.max_steps=4", "--set", "stage2.max_steps=3", *_tiny()]
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", "pipeline.sh"), *CPU_JOB, f"--output={tmp_path}/%x-%j.out"],
                       env=_submit_env(slurm, extra), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    jobs = dict(line.split() for line in r.stdout.strip().splitlines())
    assert list(jobs) == ["stage1", "reference", "stage2", "eval"]  # `autoregembed stages` with this config
    states = slurm.wait(list(jobs.values()), timeout=480)
    logs = "".join(open(f).read()[-1500:] for f in glob.glob(f"{tmp_path}/*.out"))
    assert set(states.values()) == {"COMPLETED"}, (states, logs)
    model = os.path.join(out, "stage2", "model")
    assert os.path.exists(os.path.join(model, "model.safetensors.index.json")), logs
    assert os.path.exists(os.path.join(out, "reference", "scores.safetensors"))
    result = json.load(open(os.path.join(out, "eval", "result.json")))
    assert result["model"] == model and -100 <= result["base_spearman_x100"] <= 100  # and its floor (compare_base)


def test_slurm_preemption_requeues_and_resumes_exactly(slurm, tmp_path):
    steps = 30
    runs = {}
    for name in ("straight", "preempted"):
        out = str(tmp_path / name)
        extra = ["--set", f"output_dir={out}", "--set", f"stage1.max_steps={steps}", "--set", "stage1.warmup_steps=5",
                 *_tiny()]
        env = _submit_env(slurm, extra)
        r = subprocess.run(["sbatch", "--parsable", *CPU_JOB, f"--output={tmp_path}/{name}-%j.out",
                            os.path.join(ROOT, "slurm", "stage1.sh")], env=env, capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        runs[name] = (out, r.stdout.strip().split(";")[0])
    out, job = runs["preempted"]
    path = os.path.join(out, "stage1", "metrics.jsonl")

    def signal_at(logged, args):  # once that many steps are logged; the bound is generous because both
        deadline, polls = time.time() + 480, 0  # jobs run at once on 2 cores (start-up took over 240 s in one run)
        while time.time() < deadline:
            if os.path.exists(path) and len(open(path).readlines()) >= logged:
                return subprocess.run(["scancel", *args, job], env=slurm.env, check=True, timeout=30)
            polls += 1
            if polls % 10 == 0 and slurm.job(job).get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
                logs = glob.glob(f"{tmp_path}/preempted-*.out")  # a job that failed at start ends the wait at once
                pytest.fail(f"the job ended before logging {logged} steps: " + (open(logs[0]).read()[-3000:] if logs else ""))
            time.sleep(0.2)
        pytest.fail(f"stage 1 never logged {logged} steps")

    # the time limit's warning to the batch shell, then, once the requeued run has resumed, SIGTERM to
    # the job's steps (torchrun and the ranks; srun, in the batch step, would kill the ranks at once)
    signal_at(5, ["--signal=USR1", "--batch"])
    signal_at(15, ["--signal=TERM"])
    states = slurm.wait([runs["straight"][1], job], timeout=480)
    log = open(glob.glob(f"{tmp_path}/preempted-*.out")[0]).read()
    assert states[job] == "COMPLETED", log[-3000:]
    assert int(slurm.job(job)["Restarts"]) == 2, log[-3000:]
    stops = [int(part.split(";")[0]) for part in log.split("[slurm] stage1 saved step ")[1:]]
    assert len(stops) == 2 and 5 <= stops[0] < stops[1] < steps, stops
    saved = [m["step"] for m in _losses(out, "stage1")]
    assert saved == list(range(1, steps + 1))  # each run resumed right after the previous one's checkpoint
    final = {name: _losses(o, "stage1")[-1]["loss"] for name, (o, _) in runs.items()}
    assert final["preempted"] == pytest.approx(final["straight"], rel=1e-6), final
