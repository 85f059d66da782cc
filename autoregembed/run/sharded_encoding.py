"""``encode`` over every rank of a run: rank r embeds texts r, r + W, r + 2W, ... and rank 0 gathers the
whole matrix in the texts' order (the other ranks get None).  What the mine stage encodes its corpus
with (stages.Mine, release/mining.py ``mining_embeddings``).

Why: the encoding is mining's cost (a 7B encoder over a large corpus), and on rank 0 alone it left
every other GPU idle for it.  Stop requests are agreed between chunks, so a requeue does not wait for
the whole corpus.
"""
from __future__ import annotations

import numpy as np

from ..ground import distributed as D
from ..ground.monitor import Progress
from . import preemption


class ShardedEncoder:
    CHUNK = 1024  # texts per rank between stop checks

    def __init__(self, encoder, stage_dir: str):
        self.encoder, self.stage_dir = encoder, stage_dir  # release.encoder.Encoder; where STOP is looked for

    def encode(self, texts: list[str], batch_size: int = 32, instruction: str | None = None,
               show_progress_bar: bool | str = False) -> np.ndarray | None:
        """Collective: every rank calls it with the same ``texts``; raises preemption.StopRequested on
        every rank alike when a stop is requested on any."""
        world, rank = D.world_size(), D.rank()
        mine, per_rank = texts[rank::world], -(-len(texts) // world)
        # a named progress line is one over rank 0's share, not one restarting with every chunk
        progress = Progress(show_progress_bar, len(mine), "texts") if isinstance(show_progress_bar, str) else None
        parts = []
        for start in range(0, per_rank, self.CHUNK):  # the same number of chunks on every rank
            if D.any_across_ranks(preemption.requested(self.stage_dir)):
                raise preemption.StopRequested
            chunk = mine[start : start + self.CHUNK]
            if chunk:
                inner = show_progress_bar if rank == 0 and progress is None else False
                parts.append(self.encoder.encode(chunk, batch_size=batch_size, instruction=instruction,
                                                 show_progress_bar=inner))
                if progress:
                    progress.update(start + len(chunk))
        gathered = D.gather_to_rank0(np.concatenate(parts).astype(np.float32) if parts else None)
        if gathered is None:
            return None
        dim = next(g.shape[1] for g in gathered if g is not None)
        out = np.empty((len(texts), dim), np.float32)
        for r, g in enumerate(gathered):
            if g is not None:
                out[r::world] = g
        return out
