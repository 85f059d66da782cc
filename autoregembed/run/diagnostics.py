"""Signals beside the loss that say whether a stage learns what it should, and warnings when not.

Stage 1's loss cannot tell compression from collapse: most of its early gain is a prefix that fits
every text, so a collapsed run and a compressing one reach the same loss. The **information gap**
can: the decoder's loss with the micro-batch mean of the compressed tokens (one vector for every
text) minus its loss with each text's own, in nats per target token (and per text). It is what the
compressed tokens carry about their own text; near zero, the embedding cannot tell texts apart.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import torch

from ..ground import distributed as D
from ..ground.atomic import atomic_write_text
from ..release.encoder import Encoder
from ..release.evaluate import sts_eval
from ..method.model import InformationProbe

PROBE_ROWS = 64  # stage-1 rows the information gap is measured on: the same seeded rows at every step
GAP_FLOOR = 0.05  # nats/token: below this after warm-up the compressed tokens carry ~nothing of their text
DEAD_GRAD_NORM = 1e-8  # a gradient norm this small for DEAD_STEPS steps in a row: training has died
DEAD_STEPS = 3


def information_gap(engine, batches: list) -> dict:
    """No-grad engine forwards of ``batches`` (CompressionBatch objects: the same probe rows at every
    step, so steps and seeds compare), the shared tokens being each batch's mean, averaged over ranks:
    ``loss_shared`` (nats/token with the batch-mean compressed tokens), ``info_gap`` (nats/token)
    and ``info_gap_text`` (nats/text)."""
    sums = 0
    for batch in batches:
        out = engine(InformationProbe(batch))
        sums = sums + torch.stack([out.own.sum(), out.shared.sum(), out.n_tokens.float(),
                                   out.own.new_tensor(float(len(out.own)))])
    own, shared, tokens, texts = (D.mean_across_ranks(float(v)) for v in sums.cpu())
    tokens, texts = max(tokens, 1.0), max(texts, 1.0)
    return {"loss_shared": -shared / tokens, "info_gap": (own - shared) / tokens, "info_gap_text": (own - shared) / texts}


@contextlib.contextmanager
def reading_as_export(engine, text_encoder, instruction: str, prompts: dict[str, str] | None = None):
    """The model as it is now, read as an export is read (an ``Encoder`` over the engine's encoder;
    ``prompts``: its query and document instructions), in eval mode; the engine's mode is restored
    after.  Every rank must encode the same texts: under ZeRO-3 each forward gathers parameters from
    all ranks."""
    module, training = engine.module, engine.module.training
    engine.eval()
    try:
        yield Encoder(module.encoder, text_encoder.tokenizer, module.k, instruction, text_encoder.max_text_len,
                      prompts=prompts, pooled=module.pooled)
    finally:
        engine.train(training)


def sts_during_training(engine, text_encoder, instruction: str, sts_file: str, batch_size: int) -> dict:
    """STS Spearman x100 and mean pairwise cosine of the model as it is now (``eval.every``)."""
    with reading_as_export(engine, text_encoder, instruction) as encoder:
        r = sts_eval(encoder, sts_file, batch_size, show_progress_bar="eval.every: STS")
    return {"sts_spearman": r["spearman"], "sts_mean_cosine": r["mean_cosine"]}


def retrieval_during_training(engine, text_encoder, instruction: str, prompts: dict[str, str], data,
                              batch_size: int) -> dict:
    """Retrieval of the model as it is now (``eval.every`` with ``eval.retrieval``; ``data``: a
    retrieval.RetrievalSet, read once per stage), as ``retrieval_<metric>`` record keys."""
    from ..release.retrieval import retrieval_eval

    with reading_as_export(engine, text_encoder, instruction, prompts) as encoder:
        r = retrieval_eval(encoder, data, batch_size, show_progress_bar="eval.every: retrieval corpus")
    return {f"retrieval_{k}": v for k, v in r.items() if k != "queries"}


class KeepBest:
    """``eval.keep_best``: the stage's export is the model of the ``eval.every`` evaluation that scored
    best on ``metric`` (a record key), not the last step's.  Its state (the best value and step) lives in
    ``<stage_dir>/best.json``, so a resumed run does not overwrite a better export with a worse one."""

    FILE = "best.json"

    def __init__(self, metric: str, stage_dir: str, resumed_at: int):
        self.metric, self.path = metric, os.path.join(stage_dir, self.FILE)
        self.value, self.step = None, None
        if resumed_at and os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            if saved["step"] <= resumed_at:  # a best from steps the resumed run redoes is not kept
                self.value, self.step = saved["value"], saved["step"]

    def improves(self, record: dict) -> bool:
        value = record.get(self.metric)
        return value is not None and (self.value is None or value > self.value)

    def kept(self, step: int, value: float):
        self.value, self.step = value, step
        if D.rank() == 0:
            atomic_write_text(self.path, json.dumps({"metric": self.metric, "value": value, "step": step}) + "\n")

    def describe(self, total: int) -> str:
        return f"step {self.step} of {total}: {self.metric} {self.value:.4f}, the best of eval.every's"


# Texts of different kinds and lengths that every usable model embeds as unit vectors.
ALIVE_TEXTS = ("A man is playing a guitar on the stage.", "The stock market fell sharply on Monday.",
               "How do I reset my password?", "Photosynthesis turns light into chemical energy.",
               "Two dogs run across a snowy field.", "The committee approved the new budget after a long debate.",
               "bonjour", "3.14159")


def why_dead(encoder) -> str | None:
    """Why ``encoder``'s embeddings (an ``Encoder``: L2-normalised, so a zero state stays zero) are no
    model, or None: any non-finite, or any all zero.  Such a model scores NaN and must never be exported
    as a result (training that diverged or died exits 0 otherwise)."""
    emb = encoder.encode(list(ALIVE_TEXTS), batch_size=len(ALIVE_TEXTS))
    n = len(emb)
    if not np.isfinite(emb).all():
        return f"{int((~np.isfinite(emb)).any(axis=1).sum())} of {n} probe texts embed as non-finite values"
    zero = int((np.linalg.norm(emb, axis=1) < 0.5).sum())
    return f"{zero} of {n} probe texts embed as all-zero vectors" if zero else None


class HealthWatch:
    """Reads each step's record and says, once each, when a stage has stopped learning what it should:
    gradients that vanished (a dead model would otherwise be exported with exit 0 and no word), and
    a stage-1 information gap still near zero past warm-up and half the run (compression can start
    late: on a 135M model it appeared between steps 16 and 50 of 50)."""

    def __init__(self, stage: str, warmup_steps: int, total_steps: int, log):
        self.stage, self.log = stage, log
        self.gap_from = max(warmup_steps, total_steps // 2)  # the first step a near-zero gap is warned about
        self.tiny_grads, self.warned, self.last_gap = 0, set(), None

    def update(self, record: dict):
        grad = record.get("grad_norm")
        self.tiny_grads = self.tiny_grads + 1 if grad is not None and grad < DEAD_GRAD_NORM else 0
        if self.tiny_grads >= DEAD_STEPS:
            self._warn("dead", f"WARNING: gradient norm {grad:.3g} for {self.tiny_grads} steps up to step "
                               f"{record['step']}: training has died (learning rate too high without clipping?); "
                               f"an export whose embeddings are dead is refused")
        if "info_gap" in record:
            self.last_gap = (record["step"], record["info_gap"], record["info_gap_text"])
            if record["step"] > self.gap_from and record["info_gap"] < GAP_FLOOR:
                self._warn("gap", f"WARNING: information gap {record['info_gap']:.3f} nats/token at step "
                                  f"{record['step']}: the compressed tokens carry almost nothing of their own text "
                                  f"(the loss is falling through a prefix shared by every text)")

    def summary(self) -> str | None:
        """The last information gap measured, for the stage's closing line."""
        if self.last_gap is None:
            return None
        step, tok, text = self.last_gap
        gap = f"information gap {tok:.3f} nats/token, {text:.2f} nats/text at step {step}"
        return f"WARNING: {gap}, below {GAP_FLOOR:g}: not compressing" if tok < GAP_FLOOR else gap

    def _warn(self, kind: str, msg: str):
        if kind not in self.warned:
            self.warned.add(kind)
            self.log(f"{self.stage}: {msg}")
