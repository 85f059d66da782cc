"""The stages that run a model, declared once: what each reads, starts from, batches and minimises.

The trainer's loop is the same for every training stage (rows -> batch -> engine forward ->
loss); what differs between stages is a row of this table.  ``export`` and ``eval`` read exports
and need no entry.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .batches import alignment_batch, candidate_batch, compression_batch, limit_negatives, with_in_batch_negatives
from .config import Config, OptimConfig
from . import distributed as D
from .data import SourceRows, load_sources, row_key, sampler_for
from .diagnostics import information_gap
from .loading import prepare_base
from .losses import AlignmentLoss, CompressionLoss


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    trains: bool
    data: int  # which rows it reads: stage-1 (1) or stage-2 (2), from cfg.sources(data)
    rows: Callable[[Config], list[dict]]  # its data, validated (data.load_sources)
    settings: Callable[[Config], OptimConfig]  # micro-batch size, optimiser, schedule, checkpoints
    input_model: Callable[[Config], str]  # the encoder it starts from
    make_batch: Callable  # (cfg, rows, text_encoder, reference_scores or None) -> a batches.* type
    loss: Callable[[Config], Callable] | None = None  # the objective component (losses.py)
    needs_references: bool = False  # stage-1 reference values enter its batches (from the file, or online)
    # the rows, as its batches will hold them, that the reference file must cover (needs_references)
    reference_rows: Callable[[Config, list[dict]], list[dict]] | None = None
    rescales_norm: bool = False  # the final-norm calibration before training (decoder_scale.py)
    fits_shared_prefix: bool = False  # with model.shared_prefix, its fit before training (shared_prefix.py)
    # (engine, batch) -> extra metrics, measured without gradient at every logged step (diagnostics.py)
    probe: Callable | None = None
    forms_pairs: bool = False  # its micro-batches get in-batch negatives (loss.in_batch_negatives): step_rows


def _stage2_rows(cfg: Config) -> SourceRows:
    rows = load_sources(cfg.sources(2), stage=2)
    return SourceRows([limit_negatives(r, cfg.data.max_negatives) for r in rows], rows.sizes)


def data_files(cfg: Config, stage: str) -> str:
    """Where a stage's rows come from, for messages."""
    return ", ".join(s.path for s in cfg.sources(STAGES[stage].data))


def sampler(cfg: Config, stage: str, rows: SourceRows):
    """Which rows each rank reads at each step (data.sampler_for): a pure function of the seed,
    the step, the batch settings, the sources' sizes and weights and the number of ranks."""
    o, sources = STAGES[stage].settings(cfg), cfg.sources(STAGES[stage].data)
    weights = None if sources[0].weight is None else [s.weight for s in sources]
    return sampler_for(getattr(rows, "sizes", (len(rows),)), weights, o.micro_batch_size,
                       o.gradient_accumulation_steps, D.world_size(), cfg.seed, cfg.data.same_source_batches)


def step_rows(cfg: Config, stage: str, rows: list[dict], order, step: int, micro: int, rank: int) -> list[dict]:
    """The rows ``rank`` reads at (step, micro), with their in-batch negatives when the stage forms
    pairs and ``loss.in_batch_negatives``: from its own micro-batch, or with
    ``loss.cross_device_negatives`` from every rank's (the sampler gives each rank all of them)."""
    mine = [rows[i] for i in order.indices(step, micro, rank)]
    if not (STAGES[stage].forms_pairs and cfg.loss.in_batch_negatives):
        return mine
    if not cfg.loss.cross_device_negatives:
        return with_in_batch_negatives(mine)
    return with_in_batch_negatives(mine, [rows[i] for r in range(D.world_size()) for i in order.indices(step, micro, r)])


def scheduled_rows(cfg: Config, rows: list[dict]) -> list[dict]:
    """The stage-2 rows as its batches will hold them: the rows themselves, or with
    ``loss.in_batch_negatives`` every micro-batch of its schedule (a pure function of the seed, the
    step, the batch settings and the number of ranks: data.StepSampler) with its in-batch negatives,
    each distinct row once.  What the reference stage scores and stage 2 looks up."""
    if not cfg.loss.in_batch_negatives:
        return rows
    o = cfg.stage2
    order = sampler(cfg, "stage2", rows)
    out = {}
    for step in range(o.max_steps):
        for micro in range(o.gradient_accumulation_steps):
            for rank in range(D.world_size()):
                for row in step_rows(cfg, "stage2", rows, order, step, micro, rank):
                    out.setdefault(row_key(row), row)
    return list(out.values())


def _alignment_loss(cfg: Config) -> AlignmentLoss:
    names = {f.name for f in dataclasses.fields(AlignmentLoss)}
    return AlignmentLoss(**{k: v for k, v in dataclasses.asdict(cfg.loss).items() if k in names})


STAGES = {
    "stage1": Stage("stage1", trains=True, data=1, rows=lambda cfg: load_sources(cfg.sources(1), stage=1),
                    settings=lambda cfg: cfg.stage1, input_model=prepare_base,
                    make_batch=lambda cfg, rows, te, refs: compression_batch(rows, te, cfg.loss.stage1_contrast > 0),
                    loss=lambda cfg: CompressionLoss(cfg.loss.stage1_contrast), rescales_norm=True,
                    fits_shared_prefix=True, probe=information_gap),
    "reference": Stage("reference", trains=False, data=2, rows=lambda cfg: scheduled_rows(cfg, _stage2_rows(cfg)),
                       settings=lambda cfg: cfg.stage2, input_model=lambda cfg: cfg.stage1_model_dir,
                       make_batch=lambda cfg, rows, te, refs: candidate_batch(rows, te)),
    "stage2": Stage("stage2", trains=True, data=2, rows=_stage2_rows,
                    settings=lambda cfg: cfg.stage2, input_model=lambda cfg: cfg.stage1_model_dir,
                    make_batch=lambda cfg, rows, te, refs: alignment_batch(rows, te, refs), loss=_alignment_loss,
                    needs_references=True, reference_rows=scheduled_rows, forms_pairs=True),
}
