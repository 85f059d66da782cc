"""Run monitoring: step records, the progress line, DeepSpeed's writers, the plot, warnings once."""
import json
import types
import warnings

import pytest

from autoregembed.method.batches import compression_batch, token_count
from autoregembed.ground.monitor import StepMonitor, ds_monitor_settings, read_metrics, truncate_metrics
from autoregembed.release.plot import plot_run
from autoregembed.run.stages import TRAINING
from autoregembed.ground.warnings_once import show_once


class _Writer:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events += events


def test_step_records_progress_line_and_monitor_events(tmp_path):
    lines, writer = [], _Writer()
    mon = StepMonitor("stage1", str(tmp_path), total_steps=10, start_step=2, last_step=6, log_every=2,
                      engine=types.SimpleNamespace(monitor=writer), log=lines.append)
    import torch

    for step in range(3, 5):  # losses and norms may be tensors: read back only at a flush
        mon.step(step, loss=torch.tensor(1.0 / step), lr=1e-4,
                 grad_norm=None if step == 3 else torch.tensor(0.5 * step), tokens=100)
    assert read_metrics(str(tmp_path)) == [] and lines == []
    assert mon.flush()[1] is False
    for step in range(5, 7):
        mon.step(step, loss=1.0 / step, lr=1e-4, grad_norm=0.5 * step, tokens=100)
    flushed, stop = mon.flush(stop=True)
    assert stop is True and [r["step"] for r in flushed] == [5, 6]
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [3, 4, 5, 6]
    assert records[0]["grad_norm"] is None and records[1]["grad_norm"] == 2.0
    assert all(r["tokens"] == 100 and r["tokens_per_s"] > 0 for r in records)
    assert len(lines) == 2  # steps 4 and 6 (the last of this run)
    assert lines[-1].startswith("stage1: step 6/10 loss 0.1667 lr 0.0001 grad norm 3 ")
    assert "tok/s" in lines[-1] and lines[-1].endswith("eta 0s")
    tags = {tag for tag, _, _ in writer.events}
    assert tags == {"Train/stage1/loss", "Train/stage1/lr", "Train/stage1/grad_norm", "Train/stage1/tokens_per_s"}
    assert ("Train/stage1/grad_norm", 2.0, 4) in writer.events
    truncate_metrics(str(tmp_path), 4)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [3, 4]


def test_extra_values_reach_the_record_line_and_writer_and_their_seconds_leave_tokens_per_s(tmp_path, monkeypatch):
    import autoregembed.ground.monitor as M

    clock = iter([100.0, 110.0])  # the monitor's start, then the step: 10 s of which 8 s went to a probe
    monkeypatch.setattr(M.time, "time", lambda: next(clock))
    lines, writer = [], _Writer()
    mon = StepMonitor("stage1", str(tmp_path), total_steps=1, start_step=0, last_step=1, log_every=1,
                      engine=types.SimpleNamespace(monitor=writer), log=lines.append)
    mon.step(1, 1.0, 1e-4, 1.0, tokens=400, extra={"info_gap": 0.25, "sts_spearman": 61.5}, extra_s=8.0)
    (r,), _ = mon.flush()
    assert r["tokens_per_s"] == pytest.approx(200.0) and r["elapsed_s"] == 10.0
    assert read_metrics(str(tmp_path))[0]["info_gap"] == 0.25
    assert " info gap 0.250 nats/tok STS 61.50 " in lines[0]
    assert ("Train/stage1/info_gap", 0.25, 1) in writer.events and ("Train/stage1/sts_spearman", 61.5, 1) in writer.events


def test_ds_monitor_settings_follow_the_yaml(tmp_path):
    on = types.SimpleNamespace(tensorboard=True, csv=False)
    got = ds_monitor_settings(on, str(tmp_path / "stage1"), "stage1")
    assert got == {"tensorboard": {"enabled": True, "output_path": str(tmp_path / "stage1" / "monitor"),
                                   "job_name": "stage1"}}
    assert ds_monitor_settings(types.SimpleNamespace(tensorboard=False, csv=False), "x", "stage1") == {}


def test_token_count_is_the_unpadded_tokens_of_encoder_and_decoder(tiny_base):
    from autoregembed.run.loading import load_tokenizer
    from autoregembed.method.tokenization import TextEncoder

    te = TextEncoder(load_tokenizer(tiny_base, 5), 5, 64, 64)
    rows = [{"context": t, "instruction": "Reconstruct.", "output": t} for t in ("a b c", "a much longer text here")]
    batch = compression_batch(rows, te)
    want = sum(len(te.encoder_ids(r["context"], r["instruction"])) + len(te.target_ids(r["output"])) for r in rows)
    assert token_count(batch) == want


def test_plot_writes_a_png_of_each_training_stage(tmp_path):
    for stage, n in (("stage1", 5), ("stage2", 3)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "loss": 1 / i, "lr": 1e-3, "grad_norm": None if i == 1 else 0.1 * i}) + "\n"
            for i in range(1, n + 1)))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "result.json").write_text(json.dumps({"spearman_x100": 12.5, "sts": "/x/sts-dev.csv"}))
    out = plot_run(str(tmp_path), TRAINING)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no training metrics"):
        plot_run(str(tmp_path / "eval"), TRAINING)


def test_each_distinct_warning_is_shown_once():
    shown = []
    show = show_once(lambda message, category, *a, **k: shown.append((category, str(message))))
    for _ in range(3):
        show(FutureWarning("`reduce_scatter_tensor` is deprecated"), FutureWarning, "f.py", 1)
        show(UserWarning("other"), UserWarning, "g.py", 2)
    show(FutureWarning("another text"), FutureWarning, "f.py", 1)
    assert shown == [(FutureWarning, "`reduce_scatter_tensor` is deprecated"), (UserWarning, "other"),
                     (FutureWarning, "another text")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the filters still decide: an error stays an error
        with pytest.raises(FutureWarning):
            warnings.warn("x", FutureWarning)


def test_progress_reports_rate_and_eta_at_intervals_and_at_the_end():
    from autoregembed.ground.monitor import Progress

    now, lines = [0.0], []
    p = Progress("reference", 100, "batches", lines.append, every_s=30, clock=lambda: now[0])
    for done, t in ((10, 10.0), (20, 40.0), (50, 50.0), (80, 80.0), (100, 100.0)):
        now[0] = t
        p.update(done)
    assert lines == ["reference: 20/100 batches (0.5/s) elapsed 40s eta 2m40s",
                     "reference: 80/100 batches (1.0/s) elapsed 1m20s eta 20s",
                     "reference: 100/100 batches (1.0/s) elapsed 1m40s eta 0s"]


def test_the_quiet_console_keeps_transformers_warnings_but_its_two_noises():
    """quiet.py drops the load report of an encoder-only load (only UNEXPECTED: the LM head) and the
    mean-resizing notice; a report of MISSING or MISMATCHED weights (they start random) still shows."""
    import logging

    from autoregembed.ground.quiet import _not_noise, quiet_libraries

    quiet_libraries()
    handlers = logging.getLogger("transformers").handlers
    assert handlers and all(_not_noise in h.filters for h in handlers)

    def shown(msg):
        return _not_noise(logging.LogRecord("transformers.modeling_utils", logging.WARNING, "f", 1, msg, None, None))

    assert not shown("LlamaModel LOAD REPORT from: base\\nlm_head.weight | UNEXPECTED")
    assert shown("LlamaModel LOAD REPORT from: base\\nlayers.0.mlp.up_proj.weight | MISSING")
    assert shown("LlamaModel LOAD REPORT from: base\\nembed_tokens.weight | MISMATCH")
    assert not shown("The new embeddings will be initialized ... To disable this, use `mean_resizing=False`")
    assert shown("`use_cache=True` is incompatible with gradient checkpointing")
