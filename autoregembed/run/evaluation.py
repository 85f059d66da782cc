"""The eval stage's work: STS and retrieval of an export beside the untrained base's (and a stage-2
export's beside its stage-1 start's), the verdict of how far training moved them, written to
``<output_dir>/eval/result.json`` and the export's model card.
"""
from __future__ import annotations

import json
import os

from ..ground.atomic import atomic_write_text
from .config import EvalConfig
from ..ground.monitor import log
from ..release.plot import EVAL_RESULT
from .layout import Layout


def _retrieval_line(r: dict) -> str:
    return f"nDCG@10 {r['ndcg@10']:.4f}, MRR@10 {r['mrr@10']:.4f}, recall@100 {r['recall@100']:.4f} ({r['queries']} queries)"


FLOORS = {  # the model an evaluation sets beside the export: its keys' prefix in the result, its name, what
    # moved, and whether the warning needs every figure to fall ("all") or the run's own ("headline")
    "base": ("base_", "the untrained base", "the training", "headline"),  # eval.compare_base
    # stage 2 can trade a little retrieval for STS or back within the eval's noise (the default job's
    # moves nDCG@10 by -0.004 on 256 queries and STS by +2.0): it is flagged when it lowered both
    "stage1": ("stage1_", "its stage-1 start", "stage 2", "all"),  # eval.compare_stage1
}


def _verdict(result: dict, floor: str = "base") -> str:
    """How far the training moved each figure from ``floor`` (FLOORS), with a warning when the run's own
    evaluation fell below it: retrieval nDCG@10 when the run has a retrieval set (embedders are chosen on
    retrieval), else STS; the other figure is reported beside it (against the stage-1 start, the warning
    needs both to fall)."""
    prefix, name, what, rule = FLOORS[floor]
    moves = [("STS", result["spearman_x100"] - result[f"{prefix}spearman_x100"], ".2f")]
    if "retrieval" in result and f"{prefix}retrieval" in result:
        moves.insert(0, ("retrieval nDCG@10", result["retrieval"]["ndcg@10"] - result[f"{prefix}retrieval"]["ndcg@10"],
                         ".4f"))
    text = f"{what} moved " + ", ".join(f"{m} by {d:+{f}}" for m, d, f in moves) + f" from {name}"
    fell = [m for m, d, _ in moves if d < 0]
    if rule == "headline":
        fell = fell[:1] if moves[0][1] < 0 else []
    elif len(fell) < len(moves):
        fell = []
    return text + (f"; WARNING: {' and '.join(fell)} below {name}, {what} made the embedding worse" if fell else "")


def _start_report(start: str, ev: EvalConfig) -> dict:
    """The stage-1 export's STS (and retrieval) as the export's own are measured, under ``stage1_`` keys."""
    from ..release.encoder import Encoder
    from ..release.evaluate import retrieval_report, sts_report

    model = Encoder.from_pretrained(start)
    out = {"stage1_model": start, "stage1_spearman_x100": sts_report(
        model, start, ev.sts_path, ev.batch_size, show_progress_bar="eval: the stage-1 start")["spearman_x100"]}
    if ev.retrieval_path:
        out["stage1_retrieval"] = retrieval_report(model, ev.retrieval_path, ev.batch_size, "eval: retrieval corpus")
    return out


def evaluate(ev: EvalConfig, layout: Layout, model_dir: str, start: str | None = None) -> dict:
    """STS of ``model_dir`` on ``ev.sts_path`` and its retrieval on ``ev.retrieval_path``, beside the
    untrained base's (eval.compare_base) and, for a stage-2 export, beside the stage-1 export ``start`` it
    was trained from (eval.compare_stage1: stage 2 can make a model worse than its start, and a run should
    say so, not export it in silence), as ``autoregembed eval`` prints them; also written to
    ``<output_dir>/eval/result.json`` (read by ``autoregembed plot``)."""
    from ..release.encoder import Encoder
    from ..release.evaluate import base_report, retrieval_report, sts_report
    from ..release.model_card import write_model_card

    model, retrieval = Encoder.from_pretrained(model_dir), ev.retrieval_path
    result = sts_report(model, model_dir, ev.sts_path, ev.batch_size, show_progress_bar="eval: the model")
    log(f"eval: STS Spearman x100 = {result['spearman_x100']:.2f}, mean pairwise cosine "
        f"{result['mean_pairwise_cosine']:.3f} "
        f"({ev.sts_path}, model {model_dir})")
    if retrieval:
        result["retrieval"] = retrieval_report(model, retrieval, ev.batch_size, "eval: retrieval corpus")
        log(f"eval: retrieval {_retrieval_line(result['retrieval'])} ({retrieval})")
    del model  # the base loads after it, not beside it
    if ev.compare_base:
        result.update(base_report(layout.base_model, model_dir, ev.sts_path, ev.batch_size,
                                  show_progress_bar="eval: the untrained base", retrieval=retrieval))
        log(f"eval: the untrained base, read the same way (the mean of its EMBED states): STS "
            f"{result['base_spearman_x100']:.2f}"
            + (f"; retrieval {_retrieval_line(result['base_retrieval'])}" if retrieval else ""))
        log("eval: " + _verdict(result))
    if start and ev.compare_stage1:
        result.update(_start_report(start, ev))
        log(f"eval: its stage-1 start {start}: STS {result['stage1_spearman_x100']:.2f}"
            + (f"; retrieval {_retrieval_line(result['stage1_retrieval'])}" if retrieval else ""))
        log("eval: " + _verdict(result, "stage1"))
    write_model_card(model_dir, result)  # the card shows what the run measured
    path = os.path.join(layout.output_dir, EVAL_RESULT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result
