"""Where every artifact of a run goes: one place, handed to each stage and engine at construction.

Frozen: a run's folders are decided once, from the config, before any stage runs; every later reader
(a resumed run, ``export``, ``eval``) derives the same paths from the same keys.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Layout:
    output_dir: str
    base_model: str  # the base causal LM: a folder (the tiny default's is built in <output_dir>/base) or a hub id
    stage1_model: str  # the stage-1 export later stages start from (paths.stage1_model)
    reference_scores: str  # the reference stage's file (paths.reference_scores)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.output_dir, stage)

    def checkpoint_dir(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "checkpoints")

    def export_dir(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "model")
