"""The reference stage's work: every stage-2 row scored by the stage-1 model, each rank its share,
rank 0 writing the file keyed by row content (refscores.py holds the file's format and reading).
"""
from __future__ import annotations

import torch

from . import preemption
from ..ground import distributed as D
from ..method.batches import to_device
from ..ground.data import row_key
from ..ground.monitor import Progress, log
from .session import RunContext, Session
from .trainer import StageResult
from .refscores import reusable, save_scores


@torch.no_grad()
def score_references(ctx: RunContext, st, resume: bool = False) -> StageResult:
    """Every rank scores its share of ``st.rows`` (stages.Reference); rank 0 writes the file.  Preempted:
    stopped on request before the end (PREEMPTED written; nothing partial is kept).  Resumed: a file
    with the same fingerprint that covers every row is kept as it is."""
    rows = st.rows()
    fp = ctx.reference_fingerprint()
    path = ctx.layout.reference_scores
    if resume:
        why = reusable(path, fp, rows)
        if all(D.all_gather_objects(why is None)):  # every rank takes the same branch (the scoring is collective)
            log(f"{st.name}: {path} already scores all {len(rows)} rows with this stage-1 model; kept")
            return StageResult("done", path)
        log(f"{st.name}: scoring again ({why or 'another rank cannot read the file'})")
    s = Session(ctx, st, st.input_model(ctx), train=False)
    mine = rows[D.rank() :: D.world_size()]
    bs = s.optim.micro_batch_size
    n_batches = -(-len(rows) // (bs * D.world_size()))  # the same count on every rank (ZeRO-3 gathers are collective)
    results = []
    stage_dir = ctx.layout.stage_dir(st.name)
    preemption.clear_marker(stage_dir)
    progress = Progress(st.name, n_batches, "batches")
    for b in range(n_batches):
        if preemption.requested(stage_dir):  # nothing partial is kept: the stage reruns after requeue
            preemption.honoured(stage_dir, st.name)
            log(f"{st.name}: stop requested after {b} of {n_batches} batches; exiting for requeue")
            s.close()
            return StageResult("preempted")
        chunk = mine[b * bs : (b + 1) * bs]
        real = len(chunk)
        chunk = chunk or rows[:1]  # a rank with nothing left still takes part in the collectives
        scores = s.engine(to_device(st.make_batch(chunk, s.text_encoder, None), s.device))
        owner = scores.owner.tolist()
        for i, row in enumerate(chunk[:real]):
            results.append((row_key(row), [scores.c_q[i].item()] + [scores.r[j].item() for j, o in enumerate(owner) if o == i]))
        progress.update(b + 1)
    gathered = D.all_gather_objects(results)
    if D.rank() == 0:
        merged = dict(kv for part in gathered for kv in part)
        save_scores(path, list(merged), list(merged.values()), fp)
        log(f"{st.name}: scored {len(merged)} rows -> {path}")
    D.barrier()
    s.close()
    return StageResult("done", path)
