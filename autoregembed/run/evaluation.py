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


def _verdict(result: dict, floor: str = "base", spans: dict | None = None) -> str:
    """How far the training moved each figure from ``floor`` (FLOORS), with a warning when the run's own
    evaluation fell below it: retrieval nDCG@10 when the run has a retrieval set (embedders are chosen on
    retrieval), else STS; the other figure is reported beside it (against the stage-1 start, the warning
    needs both to fall).  With ``spans`` (``paired.intervals``) each move carries its paired 95% interval, and a
    warning whose interval reaches 0 says the fall is within the evaluation's noise."""
    prefix, name, what, rule = FLOORS[floor]
    moves = [("STS", result["spearman_x100"] - result[f"{prefix}spearman_x100"], ".2f", "sts")]
    if "retrieval" in result and f"{prefix}retrieval" in result:
        moves.insert(0, ("retrieval nDCG@10", result["retrieval"]["ndcg@10"] - result[f"{prefix}retrieval"]["ndcg@10"],
                         ".4f", "retrieval"))
    spans = spans or {}
    text = f"{what} moved " + ", ".join(
        f"{m} by {d:+{f}}" + (f" (95% interval {spans[k][0]:+{f}} to {spans[k][1]:+{f}})" if k in spans else "")
        for m, d, f, k in moves) + f" from {name}"
    fell = [(m, k) for m, d, _, k in moves if d < 0]
    if rule == "headline":
        fell = fell[:1] if moves[0][1] < 0 else []
    elif len(fell) < len(moves):
        fell = []
    if not fell:
        return text
    noise = [m for m, k in fell if k in spans and spans[k][1] >= 0]
    return (text + f"; WARNING: {' and '.join(m for m, _ in fell)} below {name}, {what} made the embedding worse"
            + (f" (within the evaluation's noise for {' and '.join(noise)}: the interval reaches 0)" if noise else ""))


def _kept_intervals(result: dict, floor: str, items: dict) -> dict:
    """``paired.keep`` of the model against ``floor``, under that floor's key prefix."""
    from ..release.paired import keep

    return keep(result, FLOORS[floor][0], items["model"], items[floor])


def _start_report(start: str, ev: EvalConfig, items: dict) -> dict:
    """The stage-1 export's STS (and retrieval) as the export's own are measured, under ``stage1_`` keys."""
    from ..release.encoder import Encoder
    from ..release.evaluate import retrieval_report, sts_report

    model = Encoder.from_pretrained(start)
    out = {"stage1_model": start, "stage1_spearman_x100": sts_report(
        model, start, ev.sts_path, ev.batch_size, show_progress_bar="eval: the stage-1 start",
        items=items)["spearman_x100"]}
    if ev.retrieval_path:
        out["stage1_retrieval"] = retrieval_report(model, ev.retrieval_path, ev.batch_size, "eval: retrieval corpus",
                                                   items)
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
    items = {"model": {}, "base": {}, "stage1": {}}  # per-item scores: the verdicts' paired intervals
    result = sts_report(model, model_dir, ev.sts_path, ev.batch_size, show_progress_bar="eval: the model",
                        items=items["model"])
    log(f"eval: STS Spearman x100 = {result['spearman_x100']:.2f}, mean pairwise cosine "
        f"{result['mean_pairwise_cosine']:.3f} "
        f"({ev.sts_path}, model {model_dir})")
    if retrieval:
        result["retrieval"] = retrieval_report(model, retrieval, ev.batch_size, "eval: retrieval corpus",
                                               items["model"])
        log(f"eval: retrieval {_retrieval_line(result['retrieval'])} ({retrieval})")
    del model  # the base loads after it, not beside it
    if ev.compare_base:
        result.update(base_report(layout.base_model, model_dir, ev.sts_path, ev.batch_size,
                                  show_progress_bar="eval: the untrained base", retrieval=retrieval,
                                  items=items["base"]))
        log(f"eval: the untrained base, read the same way (the mean of its EMBED states): STS "
            f"{result['base_spearman_x100']:.2f}"
            + (f"; retrieval {_retrieval_line(result['base_retrieval'])}" if retrieval else ""))
        log("eval: " + _verdict(result, "base", _kept_intervals(result, "base", items)))
    if start and ev.compare_stage1:
        result.update(_start_report(start, ev, items["stage1"]))
        log(f"eval: its stage-1 start {start}: STS {result['stage1_spearman_x100']:.2f}"
            + (f"; retrieval {_retrieval_line(result['stage1_retrieval'])}" if retrieval else ""))
        log("eval: " + _verdict(result, "stage1", _kept_intervals(result, "stage1", items)))
    write_model_card(model_dir, result)  # the card shows what the run measured
    path = os.path.join(layout.output_dir, EVAL_RESULT)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result
