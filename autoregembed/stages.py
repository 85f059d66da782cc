"""The stages that run a model, declared once: what each reads, starts from, batches and minimises.

The trainer's loop is the same for every training stage (rows -> batch -> engine forward ->
loss); what differs between stages is a row of this table.  ``export`` and ``eval`` read exports
and need no entry.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .batches import alignment_batch, candidate_batch, compression_batch, limit_negatives
from .config import Config, OptimConfig
from .data import load_rows
from .loading import prepare_base
from .losses import AlignmentLoss, CompressionLoss


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    trains: bool
    rows: Callable[[Config], list[dict]]  # its data, validated (data.load_rows)
    data_file: Callable[[Config], str]  # where the rows come from (named in errors)
    settings: Callable[[Config], OptimConfig]  # micro-batch size, optimiser, schedule, checkpoints
    input_model: Callable[[Config], str]  # the encoder it starts from
    make_batch: Callable  # (rows, text_encoder, reference_scores or None) -> a batches.* type
    loss: Callable[[Config], Callable] | None = None  # the objective component (losses.py)
    needs_references: bool = False  # stage-1 reference scores enter its batches
    rescales_norm: bool = False  # the final-norm calibration before training (decoder_scale.py)


def _stage2_rows(cfg: Config) -> list[dict]:
    return [limit_negatives(r, cfg.data.max_negatives) for r in load_rows(cfg.data.stage2, stage=2)]


STAGES = {
    "stage1": Stage("stage1", trains=True, rows=lambda cfg: load_rows(cfg.data.stage1, stage=1),
                    data_file=lambda cfg: cfg.data.stage1, settings=lambda cfg: cfg.stage1, input_model=prepare_base,
                    make_batch=lambda rows, te, refs: compression_batch(rows, te),
                    loss=lambda cfg: CompressionLoss(), rescales_norm=True),
    "reference": Stage("reference", trains=False, rows=_stage2_rows, data_file=lambda cfg: cfg.data.stage2,
                       settings=lambda cfg: cfg.stage2, input_model=lambda cfg: cfg.stage1_model_dir,
                       make_batch=lambda rows, te, refs: candidate_batch(rows, te)),
    "stage2": Stage("stage2", trains=True, rows=_stage2_rows, data_file=lambda cfg: cfg.data.stage2,
                    settings=lambda cfg: cfg.stage2, input_model=lambda cfg: cfg.stage1_model_dir,
                    make_batch=alignment_batch, loss=lambda cfg: AlignmentLoss(**dataclasses.asdict(cfg.loss)),
                    needs_references=True),
}
