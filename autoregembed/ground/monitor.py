"""What a training stage reports per optimizer step: ``metrics.jsonl``, a progress line, and
DeepSpeed's monitor (TensorBoard / CSV writers, off unless ``monitor.*`` turns them on).

Every rank calls ``StepMonitor.step`` after each optimizer step, which only holds the step's values
(its loss may still be a device tensor), and ``flush`` every few steps, which reads them all back in
one all-reduce (losses averaged and tokens summed across ranks) and rank 0 writes them: the GPU is
waited for once per flush, not several times a step.  ``metrics.jsonl`` holds one record per step,
so a resumed run first cuts it back to its checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import time

from . import distributed as D
from .atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
MONITOR_DIR = "monitor"  # under the stage folder: DeepSpeed's TensorBoard / CSV output
BASE_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}  # the rest: a stage's extras


def log(msg: str):
    """The trainer's one output line format, printed by rank 0."""
    if D.rank() == 0:
        print(f"[autoregembed] {msg}", flush=True)


def ds_monitor_settings(monitor_cfg, stage_dir: str, stage: str) -> dict:
    """DeepSpeed config sections for the writers ``monitor.tensorboard`` / ``monitor.csv`` enable."""
    out = {}
    for key, on in (("tensorboard", monitor_cfg.tensorboard), ("csv_monitor", monitor_cfg.csv)):
        if on:
            out[key] = {"enabled": True, "output_path": os.path.join(stage_dir, MONITOR_DIR), "job_name": stage}
    return out


class Progress:
    """A long loop's progress line (done/total, rate, elapsed, eta) every ``every_s`` seconds and at
    the end, on rank 0: for work that has no training steps (reference scoring, export)."""

    def __init__(self, name: str, total: int, unit: str, log=log, every_s: float = 30.0, clock=time.monotonic):
        self.name, self.total, self.unit, self.log, self.every_s, self.clock = name, total, unit, log, every_s, clock
        self.t0 = self.t_last = clock()

    def update(self, done: int):
        now = self.clock()
        if D.rank() != 0 or (now - self.t_last < self.every_s and done < self.total):
            return
        self.t_last, elapsed = now, now - self.t0
        rate = done / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        self.log(f"{self.name}: {done}/{self.total} {self.unit} ({rate:,.1f}/s) elapsed {_duration(elapsed)} "
                 f"eta {_duration(eta)}")


class WandbRun:
    """``monitor.wandb``: one Weights & Biases run per training stage, on rank 0, holding every step
    record (what metrics.jsonl holds) at its optimizer step.  Our own writer, not DeepSpeed's: that
    one logs its learning rate at the sample count as W&B's step, after which W&B drops every value
    logged at an optimizer step (steps must not go back)."""

    def __init__(self, monitor_cfg, stage_dir: str, stage: str, config: dict):
        import wandb

        run = os.path.basename(os.path.dirname(os.path.abspath(stage_dir)))
        os.makedirs(stage_dir, exist_ok=True)
        self.stage = stage
        self.run = wandb.init(project=monitor_cfg.wandb_project, group=run,
                              name=os.environ.get("WANDB_NAME") or f"{run}-{stage}",
                              dir=os.environ.get("WANDB_DIR") or stage_dir, config=config,
                              settings=wandb.Settings(quiet=True))  # no ~30-line summary a stage: the run says it

    def log(self, record: dict):
        self.run.log({f"{self.stage}/{k}": v for k, v in record.items() if k != "step" and v is not None},
                     step=record["step"])


def finish_wandb():
    """End this process's W&B run (a stage's), so the next stage starts its own."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def read_metrics(stage_dir: str) -> list[dict]:
    path = os.path.join(stage_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(stage_dir: str, step: int):
    """After resuming at ``step``, keep the records up to it: the steps logged after that
    checkpoint (before the crash) are about to be logged again."""
    path = os.path.join(stage_dir, METRICS_FILE)
    if D.rank() == 0 and os.path.exists(path):
        kept = [r for r in read_metrics(stage_dir) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    D.barrier()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_line(stage: str, r: dict, total: int, elapsed: float, eta: float) -> str:
    grad = "n/a" if r.get("grad_norm") is None else f"{r['grad_norm']:.3g}"
    gap = f" info gap {r['info_gap']:.3f} nats/tok" if "info_gap" in r else ""
    gap += f" STS {r['sts_spearman']:.2f}" if "sts_spearman" in r else ""
    gap += f" nDCG@10 {r['retrieval_ndcg@10']:.4f}" if "retrieval_ndcg@10" in r else ""
    return (f"{stage}: step {r['step']}/{total} loss {r['loss']:.4f}{gap} lr {r['lr']:.3g} grad norm {grad} "
            f"{r['tokens_per_s']:,.0f} tok/s elapsed {_duration(elapsed)} eta {_duration(eta)}")


class StepMonitor:
    """One stage's step records.  ``engine``: DeepSpeed's, whose ``monitor`` receives the same
    values as ``Train/<stage>/<name>`` when a writer is enabled; ``wandb``: a WandbRun (rank 0)."""

    def __init__(self, stage: str, stage_dir: str, total_steps: int, start_step: int, last_step: int,
                 log_every: int, engine=None, log=print, wandb: WandbRun | None = None):
        self.stage, self.stage_dir, self.total, self.log_every = stage, stage_dir, total_steps, log_every
        self.start, self.last, self.engine, self.log, self.wandb = start_step, last_step, engine, log, wandb
        self.t0 = self.t_last = time.time()
        self.held = []

    def step(self, step: int, loss, lr: float, grad_norm, tokens: int, extra: dict | None = None,
             extra_s: float = 0.0):
        """Hold optimizer step ``step`` (1-based) until ``flush``: ``loss`` (this rank's mean) and
        ``grad_norm`` may be device tensors; ``tokens``: this rank's non-padding tokens; ``extra``:
        more values for the step's record (a stage's probe, diagnostics.py), measured in ``extra_s``
        seconds that tokens/s leaves out (the elapsed time and the eta keep them)."""
        self.held.append((step, loss, lr, grad_norm, tokens, extra or {}, extra_s))

    def flush(self, stop: bool = False) -> tuple[list[dict], bool]:
        """Read the held steps back, write their records (rank 0) and return them with whether any
        rank asked to stop (``stop``: this rank's request, carried by the same all-reduce).  Each
        record's tokens/s is its flush window's."""
        held, self.held = self.held, []
        sums = D.sum_across_ranks([h[1] for h in held] + [float(h[4]) for h in held] + [float(stop)])
        n, world = len(held), D.world_size()
        now = time.time()
        rate = sum(sums[n : 2 * n]) / max(now - self.t_last - sum(h[6] for h in held), 1e-9)
        self.t_last, elapsed = now, now - self.t0
        records = []
        for i, (step, _, lr, grad_norm, _, extra, _) in enumerate(held):
            grad = None if grad_norm is None else float(grad_norm)
            records.append({"step": step, "loss": sums[i] / world, "lr": lr,
                            "grad_norm": grad if grad is not None and math.isfinite(grad) else None,
                            "tokens": int(sums[n + i]), "tokens_per_s": rate, "elapsed_s": round(elapsed, 3),
                            **extra})
        if D.rank() == 0:
            self._write(records, elapsed)
        return records, sums[-1] > 0

    def _write(self, records: list[dict], elapsed: float):
        os.makedirs(self.stage_dir, exist_ok=True)
        with open(os.path.join(self.stage_dir, METRICS_FILE), "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        monitor = getattr(self.engine, "monitor", None)
        for record in records:
            step = record["step"]
            if monitor is not None and monitor.enabled:
                monitor.write_events([(f"Train/{self.stage}/{k}", record[k], step)
                                      for k in ("loss", "lr", "grad_norm", "tokens_per_s", *record.keys() - BASE_KEYS)
                                      if record[k] is not None])
            if self.wandb is not None:
                self.wandb.log(record)
            if step % self.log_every == 0 or step == self.last:
                eta = elapsed / max(step - self.start, 1) * (self.last - step)
                self.log(progress_line(self.stage, record, self.total, elapsed, eta))
