"""``autoregembed plot RUN_DIR``: loss, learning rate and gradient norm per training stage, as a PNG.

Reads each stage's ``metrics.jsonl`` and, when the run evaluated, ``eval/result.json``.
"""
from __future__ import annotations

import json
import os

from ..ground.atomic import atomic_file
from ..ground.errors import InputError
from ..ground.monitor import read_metrics

PANELS = (("loss", "loss"), ("info_gap", "information gap\n(nats/token)"),
          ("sts_spearman", "STS Spearman x100\n(eval.every)"), ("retrieval_ndcg@10", "retrieval nDCG@10\n(eval.every)"),
          ("lr", "learning rate"), ("grad_norm", "gradient norm"))
EVAL_RESULT = os.path.join("eval", "result.json")


def plot_run(run_dir: str, stages: tuple[str, ...], out: str | None = None) -> str:
    """Write the PNG (default ``RUN_DIR/metrics.png``) and return its path; ``stages``: the training
    stages, in order (stages.TRAINING), one column each where it wrote metrics."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    stages = {name: read_metrics(os.path.join(run_dir, name)) for name in stages}
    stages = {name: recs for name, recs in stages.items() if recs}
    if not stages:
        raise InputError(f"{run_dir}: no training metrics (no <stage>/metrics.jsonl with records)")
    panels = [(key, label) for key, label in PANELS  # a quantity no stage measured gets no row
              if any(r.get(key) is not None for recs in stages.values() for r in recs)]
    fig, axes = plt.subplots(len(panels), len(stages), figsize=(5 * len(stages), 2.6 * len(panels)),
                             squeeze=False, sharex="col")
    for col, (name, recs) in enumerate(stages.items()):
        steps = [r["step"] for r in recs]
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            values = [r.get(key) for r in recs]
            points = [(s, v) for s, v in zip(steps, values) if v is not None]
            if points:
                ax.plot(*zip(*points), lw=1.2, marker="." if len(points) < 30 else None)
            else:  # e.g. the information gap, which only stage 1 measures
                ax.text(0.5, 0.5, "not measured in this stage", ha="center", va="center", transform=ax.transAxes,
                        color="gray")
                ax.set_yticks([])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(name)
        axes[-1][col].set_xlabel("optimizer step")
    eval_path = os.path.join(run_dir, EVAL_RESULT)
    if os.path.exists(eval_path):
        with open(eval_path) as f:
            r = json.load(f)
        base = f", untrained base {r['base_spearman_x100']:.2f}" if "base_spearman_x100" in r else ""
        fig.suptitle(f"eval: STS Spearman x100 = {r['spearman_x100']:.2f}{base} ({os.path.basename(r['sts'])})")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    with atomic_file(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out
