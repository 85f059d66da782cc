"""Faults that used to lose finished work: an earlier run's checkpoints, a stale or missing `latest`,
a truncated checkpoint, a full disk, a second run into the same folder, blank input lines."""
import fcntl
import json
import math
import os
import shutil

import numpy as np
import pytest

from helpers import ROOT, TINY_BASE, child_command, child_env, patched_train, run_child, run_train

from autoregembed.run.preemption import EXIT_STOPPED

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("default_tiny_base")]

TINY = ["stage1.micro_batch_size=4", "stage1.warmup_steps=0", "model.match_decoder_scale=false", "stage=stage1"]


def _train(out, *overrides, resume=False, script=None, ranks=None):
    sets = [a for kv in [*TINY, f"model.base={TINY_BASE['path']}", f"output_dir={out}", *overrides] for a in ("--set", kv)]
    return run_child([script or os.path.join(ROOT, "train.py"), *sets] + (["--resume"] if resume else []), ranks=ranks)


def _ckpt(out):
    return os.path.join(out, "stage1", "checkpoints")


def _listing(out):
    """Checkpoint tags and `latest` (DeepSpeed also drops its conversion scripts there)."""
    return sorted(n for n in os.listdir(_ckpt(out)) if n.startswith(("step", "latest")))


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]


def _steps(out):
    return [json.loads(line)["step"] for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished 6-step stage 1 (checkpoints at steps 4 and 6 kept, an export)."""
    out = str(tmp_path_factory.mktemp("faults") / "run")
    r = _train(out, "stage1.max_steps=6", "stage1.save_every=2", "stage1.keep_last=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _listing(out) == ["latest", "step00000004", "step00000006"]
    return out


def test_fresh_run_sets_earlier_checkpoints_aside_and_resume_falls_back_past_a_truncated_one(earlier_run):
    out = earlier_run
    # a fresh, shorter run into the same folder: the earlier step-4/6 checkpoints used to be
    # "newer" than this run's and pruning deleted each new checkpoint right after writing it
    r = _train(out, "stage1.max_steps=4", "stage1.save_every=1", "stage1.keep_last=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held checkpoints of an earlier run; moved to" in r.stdout
    assert _listing(out) == ["latest", "step00000003", "step00000004"]
    assert open(os.path.join(_ckpt(out), "latest")).read() == "step00000004"
    aside = [d for d in os.listdir(os.path.join(out, "stage1")) if d.startswith("checkpoints.earlier-")]
    assert len(aside) == 1 and {"step00000004", "step00000006"} <= set(os.listdir(os.path.join(out, "stage1", aside[0])))
    assert _steps(out) == [1, 2, 3, 4]  # the earlier run's metrics went aside with its checkpoints
    straight = _losses(out)

    # `latest` gone and the newest checkpoint truncated: resume takes the newest complete one and says so
    os.remove(os.path.join(_ckpt(out), "latest"))
    newest = os.path.join(_ckpt(out), "step00000004")
    victim = max((os.path.join(root, n) for root, _, names in os.walk(newest) for n in names if n.endswith(".pt")),
                 key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    r = _train(out, "stage1.max_steps=4", "stage1.save_every=1", "stage1.keep_last=2", resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping checkpoint" in r.stdout and "step00000004: " in r.stdout and "bytes" in r.stdout
    assert "loaded checkpoint" in r.stdout and "step00000003 (step 3)" in r.stdout
    assert _steps(out) == [1, 2, 3, 4]  # one clean history: the step-4 record was logged again, once
    assert _losses(out) == pytest.approx(straight, rel=1e-6)  # and step 4 retraced exactly


def test_blank_input_lines_keep_their_rows(earlier_run, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("a man plays the guitar\n\nthe stock market fell\n")
    npy = tmp_path / "emb.npy"
    r = run_child(["-m", "autoregembed.tools.cli", "encode", "--model", os.path.join(earlier_run, "stage1", "model"),
                   "--input", texts, "--output", npy])
    assert r.returncode == 0, r.stderr[-3000:]
    emb = np.load(npy)
    assert emb.shape[0] == 3 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # a damaged export description is named, in one line
    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(earlier_run, "stage1", "model"), broken)
    (broken / "autoregembed.json").write_text("{not json")
    r = run_child(["-m", "autoregembed.tools.cli", "encode", "--model", broken, "--input", texts, "--output", npy])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{broken / 'autoregembed.json'}: not a valid autoregembed export description" in r.stderr


FULL_DISK = """
import errno, os, torch
real = torch.save
def save(obj, f, *a, **kw):
    if "step00000004.partial" in str(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(obj, f, *a, **kw)
torch.save = save
"""


def test_a_failed_save_cleans_up_says_why_and_keeps_the_previous_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    r = _train(out, "stage1.max_steps=6", "stage1.save_every=2", script=patched_train(tmp_path, FULL_DISK))
    assert r.returncode != 0
    assert "saving " in r.stderr and "step00000004 failed (" in r.stderr and "No space left on device" in r.stderr
    assert "step00000002 is intact" in r.stderr
    assert _listing(out) == ["latest", "step00000002"]  # no .partial left behind
    r = _train(out, "stage1.max_steps=6", "stage1.save_every=2", resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step00000002 (step 2)" in r.stdout and _steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_second_run_into_a_busy_folder_is_refused_before_anything_loads(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("PID 4242 on somehost (since 2026-11-26 00:00:00)\n")
        held.flush()
        r = _train(str(out), "stage1.max_steps=2")
    assert r.returncode != 0
    assert "is in use by PID 4242 on somehost" in r.stderr
    assert not (out / "stage1").exists()


COUNT_READ_BACKS = """
import json, atexit
from autoregembed.ground import distributed
from autoregembed.run import preemption
calls = {"read_backs": 0, "stop_checks": 0}
def _counted(fn, key):
    def wrapper(*a, **k):
        calls[key] += 1
        return fn(*a, **k)
    return wrapper
distributed.sum_across_ranks = _counted(distributed.sum_across_ranks, "read_backs")
preemption.asked = _counted(preemption.asked, "stop_checks")
atexit.register(lambda: print("CALLS " + json.dumps(calls)))
"""


def test_the_step_loop_waits_for_the_device_only_every_few_steps(tmp_path):
    """Metrics stay on the device and stop requests wait (preemption.CHECK_EVERY) between flushes: 12
    steps logged every 10 read back at steps 1 (a stop asked for while loading), 5, 10 and 12, and
    still record every step."""
    out = str(tmp_path / "run")
    r = _train(out, "stage1.max_steps=12", "stage1.log_every=10", script=patched_train(tmp_path, COUNT_READ_BACKS))
    assert r.returncode == 0, r.stderr[-3000:]
    calls = json.loads(r.stdout.split("CALLS ")[-1])
    assert calls == {"read_backs": 4, "stop_checks": 4}
    assert _steps(out) == list(range(1, 13)) and all(math.isfinite(v) for v in _losses(out))


def test_a_stop_request_made_while_loading_is_honoured_not_deleted(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "stage1"))
    open(os.path.join(out, "stage1", "STOP"), "w").close()  # what the Slurm trap writes, before the model loads
    r = _train(out, "stage1.max_steps=4")
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]  # not 0: `train.py && next-step` must not go on
    assert open(os.path.join(out, "stage1", "PREEMPTED")).read() == "1"
    assert not os.path.exists(os.path.join(out, "stage1", "STOP"))  # consumed: the requeued run goes on
    assert _listing(out) == ["latest", "step00000001"]
    r = _train(out, "stage1.max_steps=4", resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(out) == [1, 2, 3, 4] and not os.path.exists(os.path.join(out, "stage1", "PREEMPTED"))


def test_a_stop_request_at_the_reference_stage_ends_the_run_for_requeue(earlier_run):
    ref_dir = os.path.join(earlier_run, "reference")
    os.makedirs(ref_dir, exist_ok=True)
    open(os.path.join(ref_dir, "STOP"), "w").close()
    model = os.path.join(earlier_run, "stage1", "model")
    r = _train(earlier_run, "stage=reference", f"paths.stage1_model={model}")
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]
    assert open(os.path.join(ref_dir, "PREEMPTED")).read() == "reference"
    assert not os.path.exists(os.path.join(ref_dir, "STOP")) and not os.path.exists(os.path.join(ref_dir, "scores.safetensors"))


@pytest.mark.parametrize("ranks", [None, 2])
def test_resumed_reference_stage_keeps_a_current_score_file(earlier_run, tmp_path, ranks):
    """On 2 ranks every rank must find the file current (a collective) before any keeps it."""
    scores = str(tmp_path / "scores.safetensors")
    args = ("stage=reference", f"paths.stage1_model={os.path.join(earlier_run, 'stage1', 'model')}",
            f"paths.reference_scores={scores}")
    r = _train(earlier_run, *args, ranks=ranks)
    assert r.returncode == 0, r.stderr[-3000:]
    written = (os.stat(scores).st_mtime_ns, open(scores, "rb").read())
    r = _train(earlier_run, *args, resume=True, ranks=ranks)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already scores all 256 rows with this stage-1 model; kept" in r.stdout
    assert (os.stat(scores).st_mtime_ns, open(scores, "rb").read()) == written


def test_a_signal_sets_the_request_until_it_is_honoured(tmp_path):
    import signal

    from autoregembed.run import preemption

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption.install()
        assert not preemption.requested(str(tmp_path))
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested(str(tmp_path)) and preemption.requested(str(tmp_path))  # not consumed by asking
        preemption.honoured(str(tmp_path), "7")
        assert not preemption.requested(str(tmp_path)) and (tmp_path / "PREEMPTED").read_text() == "7"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


KILL_IN_EXPORT = """
import os, signal
import autoregembed.release.export as export
export.save_file = lambda *a, **kw: os.kill(os.getpid(), signal.SIGKILL)  # dies writing the first shard
"""


def test_a_kill_during_export_keeps_the_previous_export_and_the_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    r = _train(out, "stage1.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    model = os.path.join(out, "stage1", "model")

    def snapshot():
        return {n: os.path.getsize(os.path.join(model, n)) for n in sorted(os.listdir(model))}

    before = snapshot()
    r = _train(out, "stage1.max_steps=2", "stage=export", "paths.export_from=stage1",
               script=patched_train(tmp_path, KILL_IN_EXPORT))
    assert r.returncode != 0  # killed
    assert snapshot() == before  # the earlier export is untouched, not half-replaced
    assert _listing(out) == ["latest", "step00000002"]
    r = _train(out, "stage1.max_steps=2", "stage=export", "paths.export_from=stage1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert snapshot() == before and "loaded checkpoint" in r.stdout
    assert not [n for n in os.listdir(os.path.join(out, "stage1")) if ".tmp-" in n]  # the killed export's leftovers swept


SIGTERM_IN_REFERENCE = """
import os, signal
import autoregembed.run.stages as stages
real, calls = stages.candidate_batch, []
def batch_then_term(*a, **kw):
    calls.append(1)
    if len(calls) == 2:  # the scheduler's SIGTERM arrives while the second batch is scored
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **kw)
stages.candidate_batch = batch_then_term
"""


def test_sigterm_during_reference_scoring_is_not_swallowed(earlier_run, tmp_path):
    model = os.path.join(earlier_run, "stage1", "model")
    r = _train(earlier_run, "stage=reference", f"paths.stage1_model={model}",
               script=patched_train(tmp_path, SIGTERM_IN_REFERENCE))
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]
    assert "reference: stop requested after 2 of 32 batches" in r.stdout
    ref_dir = os.path.join(earlier_run, "reference")
    assert open(os.path.join(ref_dir, "PREEMPTED")).read() == "reference"
    assert not os.path.exists(os.path.join(ref_dir, "scores.safetensors"))


def test_one_key_of_a_stage_section_keeps_its_defaults_through_training_and_export(tmp_path):
    """``--set stage1.max_steps=2`` alone: stage 1 still trains 16-row micro-batches at its own
    learning rate, the export records them, and a later export from the checkpoint is not refused."""
    out = str(tmp_path / "run")
    sets = ["stage=stage1", "stage1.max_steps=2", "model.match_decoder_scale=false", "model.shared_prefix_steps=2",
            f"model.base={TINY_BASE['path']}", f"output_dir={out}"]
    r = run_train(sets, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    training = json.load(open(os.path.join(out, "stage1", "model", "autoregembed.json")))["training"]
    assert training["batch"] == "16 x 1 accumulation x 1 ranks"
    assert training["learning rate"] == "0.001 (linear, 5 warm-up steps)"
    r = run_child([os.path.join(ROOT, "train.py"),
                   *[a for kv in sets + ["stage=export", "paths.export_from=stage1"] for a in ("--set", kv)]])
    assert r.returncode == 0, r.stderr[-3000:]


ZERO_EMBEDDINGS = """
from transformers.models.llama import modeling_llama
modeling_llama.LlamaRMSNorm.forward = lambda self, x: x * 0  # every normalised state, the last one too, is zero
"""


def test_a_dead_model_is_never_exported_and_its_checkpoint_is_kept(tmp_path):
    """A model whose embeddings are all zero (made so by a patch: lr 1e3 did it on one machine and not on
    another) scores NaN: the run stops with one line and exit 2 instead of exporting it, and the checkpoint
    stays for a look."""
    out = str(tmp_path / "run")
    r = _train(out, "stage1.max_steps=10", "model.shared_prefix_steps=2", script=patched_train(tmp_path, ZERO_EMBEDDINGS))
    assert r.returncode == 2, r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("autoregembed: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "stage1: the trained model is dead (8 of 8 probe texts embed as all-zero vectors); not exported" in err[0]
    assert "lower stage1.learning_rate (now 0.001)" in err[0]
    assert not os.path.exists(os.path.join(out, "stage1", "model"))
    assert _listing(out) == ["latest", "step00000010"]


INF_GRADIENTS_FROM_STEP_3 = """
import torch
from autoregembed.method.losses import CompressionLoss
real, calls = CompressionLoss.__call__, []

class InfGrad(torch.autograd.Function):  # the loss as it is; its gradient non-finite
    forward = staticmethod(lambda ctx, x: x.clone())
    backward = staticmethod(lambda ctx, g: g * float("inf"))

def call(self, out, batch):
    calls.append(1)
    loss = real(self, out, batch)
    return InfGrad.apply(loss) if len(calls) >= 3 else loss
CompressionLoss.__call__ = call
"""


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_steps_skipped_for_non_finite_gradients_stop_the_stage_instead_of_exporting(tmp_path, dtype):
    """ZeRO skips an update whose gradients are non-finite and the loss stays finite: at fp32 and bf16 (no
    loss scaler) the stage stopped training in silence and exported with exit 0.  Now it stops at the next
    flush with one line naming the first skipped step, and exports nothing."""
    out = str(tmp_path / "run")
    r = _train(out, "stage1.max_steps=8", "stage1.log_every=4", "model.shared_prefix_steps=2", f"model.dtype={dtype}",
               script=patched_train(tmp_path, INF_GRADIENTS_FROM_STEP_3))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("autoregembed: error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "stage1: gradients were non-finite from step 3 (2 of 4 steps skipped" in err[0], err[0]
    assert "lower stage1.learning_rate (now 0.001) or set stage1.gradient_clipping" in err[0]
    assert not os.path.exists(os.path.join(out, "stage1", "model"))


STOP_IN_EVAL = """
import os, signal, time
import autoregembed.release.evaluate as evaluate
real = evaluate.sts_eval
def stopped_while_encoding(*a, **kw):
    if {signal!r}:
        os.kill(os.getpid(), signal.SIGTERM)
    else:  # what the Slurm trap writes; the stage polls for it
        open(os.path.join({out!r}, "eval", "STOP"), "w").close()
    for _ in range(200):  # encoding: short calls, between which the stop lands
        time.sleep(0.05)
    return real(*a, **kw)
evaluate.sts_eval = stopped_while_encoding
"""


@pytest.mark.parametrize("how", ["signal", "file"])
def test_a_stop_during_eval_is_honoured_with_one_line_and_the_stopped_status(earlier_run, tmp_path, how):
    """SIGTERM (or the STOP file) during the eval stage used to run on, say nothing and exit 0."""
    eval_dir = os.path.join(earlier_run, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    args = ("stage=eval", "paths.export_from=stage1")
    patch = STOP_IN_EVAL.format(signal=how == "signal", out=earlier_run)
    r = _train(earlier_run, *args, script=patched_train(tmp_path, patch))
    assert r.returncode == EXIT_STOPPED, r.stderr[-3000:]
    assert "eval: stop requested; exiting for requeue (the stage reruns)" in r.stdout and "Traceback" not in r.stderr
    assert open(os.path.join(eval_dir, "PREEMPTED")).read() == "eval"
    assert not os.path.exists(os.path.join(eval_dir, "STOP")) and not os.path.exists(os.path.join(eval_dir, "result.json"))
    r = _train(earlier_run, *args, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(eval_dir, "result.json")))["spearman_x100"] > -100
    os.remove(os.path.join(eval_dir, "result.json"))


def test_ctrl_c_during_training_saves_says_one_line_and_resumes_exactly(tmp_path):
    """Ctrl-C used to print a 97-line KeyboardInterrupt traceback and save nothing."""
    import signal
    import subprocess
    import time

    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    steps = ("stage1.max_steps=16", "stage1.log_every=1")
    assert _train(straight, *steps).returncode == 0
    sets = [a for kv in [*TINY, f"model.base={TINY_BASE['path']}", f"output_dir={stopped}", *steps] for a in ("--set", kv)]
    proc = subprocess.Popen(child_command([os.path.join(ROOT, "train.py"), *sets]), env=child_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(stopped, "stage1", "metrics.jsonl")
    deadline = time.time() + 120
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    saved = [line for line in out.splitlines() if "stop requested; saved step" in line]
    assert len(saved) == 1, out[-3000:]
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert 3 <= step < 16 and open(os.path.join(stopped, "stage1", "PREEMPTED")).read() == str(step)
    r = _train(stopped, *steps, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(stopped) == list(range(1, 17))
    assert _losses(stopped) == pytest.approx(_losses(straight), rel=1e-6)


def test_a_second_ctrl_c_quits_and_one_ctrl_c_seen_twice_does_not(monkeypatch, tmp_path):
    """Under torchrun one Ctrl-C reaches a rank twice (the terminal's, then torchrun's): within
    DEBOUNCE_S that is still one request; a later second Ctrl-C is the user quitting."""
    import signal

    from autoregembed.run import preemption

    clock = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    old = signal.getsignal(signal.SIGINT)
    try:
        preemption.install()
        preemption._handler(signal.SIGINT, None)
        clock[0] += preemption.DEBOUNCE_S / 2
        preemption._handler(signal.SIGINT, None)  # the same Ctrl-C, relayed
        assert preemption.requested(str(tmp_path))
        clock[0] += preemption.DEBOUNCE_S
        with pytest.raises(KeyboardInterrupt):
            preemption._handler(signal.SIGINT, None)
        preemption.honoured(str(tmp_path), "1")  # a request honoured starts the count again
        preemption._handler(signal.SIGINT, None)
        assert preemption.requested(str(tmp_path))
        preemption.honoured(str(tmp_path), "2")
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_corrupt_file_of_the_right_size_is_named_and_the_previous_checkpoint_loads(tmp_path):
    """The size manifest cannot see garbage written over a file: the load fails, names the file, and every
    rank falls back to the checkpoint before it (it used to name the folder and stop)."""
    straight, out = str(tmp_path / "straight"), str(tmp_path / "run")
    args = ("stage1.max_steps=4", "stage1.save_every=2", "stage1.keep_last=2")
    assert _train(straight, *args).returncode == 0
    assert _train(out, *args).returncode == 0
    path = os.path.join(_ckpt(out), "step00000004", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(b"\0" * 512)  # the archive's header, overwritten in place
    assert os.path.getsize(path) == size
    r = _train(out, *args, resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping checkpoint {_ckpt(out)}/step00000004: cannot read {path} (" in r.stdout
    assert f"loaded checkpoint {_ckpt(out)}/step00000002 (step 2)" in r.stdout
    assert _steps(out) == [1, 2, 3, 4] and _losses(out) == pytest.approx(_losses(straight), rel=1e-6)
