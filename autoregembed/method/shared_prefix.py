"""Stage-1 option (``model.shared_prefix``): a learned prefix, the same for every text, that the
frozen decoder reads between the compressed tokens and the target: [BOS] e_1..e_k P_1..P_n target.

Why: early in stage 1 most of what lowers the reconstruction loss fits every text (a prompt that
says "a sentence follows"), so the encoder learns to write that into e_1..e_k, mostly into the
positions next to the target, and the compressed tokens carry little of their own text
(issue 26; docs/experiments.md).  P is fitted to that text-independent part first, by prompt
tuning on the frozen decoder with the encoder's initial e in place, and then held fixed: what is
left for e to lower is what differs between texts.

P belongs to the decoder's side of a stage-1 model: it is written beside the encoder in every
export (``PREFIX_FILE``), read back by whatever scores with that model (reference scores, stage 2,
``reconstruct``), and never enters the text embedding, which stays mean(e_1..e_k).
"""
from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file

from ..ground.errors import InputError
from .losses import compression_loss

PREFIX_FILE = "shared_prefix.safetensors"


def with_shared_prefix(compressed: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """What the decoder reads where the published method reads e alone: [e_1..e_k ; P_1..P_n]."""
    if prefix is None:
        return compressed
    p = prefix.to(device=compressed.device, dtype=compressed.dtype)
    return torch.cat([compressed, p.expand(compressed.shape[0], -1, -1)], dim=1)


def initial_prefix(mean_e: torch.Tensor, n: int) -> torch.Tensor:
    """P starts as the batch mean of e, position by position (cycled when n > k): the decoder then
    reads exactly what the information probe's "shared" condition gives it."""
    return mean_e[torch.arange(n) % mean_e.shape[0]].clone()


def fit_shared_prefix(model, batches: list, n: int, steps: int, lr: float,
                      on_step=None) -> tuple[torch.Tensor, float, float]:
    """Fit P [n, D] (fp32) by Adam on the stage-1 loss of ``batches`` (``CompressionBatch`` on the
    model's device), the encoder's compressed tokens held fixed; returns (P, the loss with the
    initial P, the loss with the fitted P), both over all ``batches``.  Deterministic: the batches
    are visited in order, nothing is drawn.  ``on_step(done)`` after each step (progress)."""
    if n < 1 or steps < 0 or not batches:
        raise InputError(f"key 'model.shared_prefix': needs n >= 1 vectors, steps >= 0 and rows to fit on "
                         f"(got n={n}, steps={steps}, {len(batches)} batches)")
    if model.shared_prefix is not None:
        raise ValueError("fit_shared_prefix: the model already reads a shared prefix")
    with torch.no_grad():
        es = [model.compress(b.input_ids, b.attention_mask).float() for b in batches]
    mean_e = torch.cat(es).mean(dim=0)
    prefix = torch.nn.Parameter(initial_prefix(mean_e, n))
    opt = torch.optim.Adam([prefix], lr=lr)

    def loss_on(b, e):
        return compression_loss(model.score(with_shared_prefix(e, prefix), b.target_ids, b.target_mask),
                                b.target_mask.sum())

    def mean_loss():
        with torch.no_grad():
            return float(sum(loss_on(b, e) * b.target_mask.sum() for b, e in zip(batches, es))
                         / sum(b.target_mask.sum() for b in batches))

    before = mean_loss()
    for step in range(steps):
        b = step % len(batches)
        opt.zero_grad(set_to_none=True)
        loss_on(batches[b], es[b]).backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)
    return prefix.detach(), before, mean_loss()


def write_prefix(path: str, prefix: torch.Tensor):
    """Write P to ``path`` (PREFIX_FILE in an export being built, or a stage folder's temporary file)."""
    save_file({"shared_prefix": prefix.detach().float().cpu().contiguous()}, path)


def read_prefix(folder: str) -> torch.Tensor | None:
    """P of the model in ``folder``, or None when it was trained without one."""
    path = os.path.join(folder, PREFIX_FILE)
    if not os.path.exists(path):
        return None
    try:
        prefix = load_file(path)["shared_prefix"]
    except Exception as e:  # a truncated or foreign file
        raise InputError(f"{path}: not a readable shared prefix ({e})") from None
    if prefix.dim() != 2:
        raise InputError(f"{path}: a shared prefix is [n, hidden], got shape {tuple(prefix.shape)}")
    return prefix
