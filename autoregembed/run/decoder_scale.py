"""Stage-1 initialisation: rescale the encoder's final norm so that the compressed tokens reach
the frozen decoder with the per-dimension magnitudes of the word embeddings it was trained on.

Why: the decoder reads e_1..e_k where it normally reads word embeddings, but e are the encoder's
last-layer states, taken after its final norm, often an order of magnitude larger per dimension;
Adam moves the final-norm weight by about the learning rate per step, so plain fine-tuning spends
thousands of steps undoing the mismatch before it learns to compress.  Multiplying each dimension
of that weight once, before stage 1, by rms_d(word embeddings) / rms_d(e) removes it (measurements:
docs/experiments.md, "Findings moved out of docstrings").

The factors are measured through the model's own forward on a seeded sample of stage-1 rows, so they
work under ZeRO-3 (the engine's hooks gather what each call needs), and every rank measures
the same rows, so every rank computes the same factors.  The text embedding
(normalize(mean(e))) only changes by a fixed diagonal rescale; stage 2, reference scores and
inference need nothing special because the scale lives in the exported weights.
"""
from __future__ import annotations

import random

import torch
from torch import nn

from ..ground import distributed as D
from ..ground.errors import InputError

_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def final_norm(encoder: nn.Module) -> nn.Module:
    """The norm whose output is the encoder's last_hidden_state (LLaMA/Mistral/Qwen: ``norm``)."""
    base = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder  # peft-wrapped
    for name in _FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module) and isinstance(getattr(module, "weight", None), torch.Tensor):
            return module
    raise InputError(f"{type(base).__name__} has no final norm with a weight (looked for "
                     f"{', '.join(_FINAL_NORM_NAMES)}); set model.match_decoder_scale=false")


def calibration_indices(n_total: int, n_rows: int, seed: int) -> list[int]:
    """Which stage-1 rows to measure on: a seeded sample, in file order."""
    return sorted(random.Random(seed).sample(range(n_total), min(n_rows, n_total)))


@torch.no_grad()
def scale_factors(model, batches) -> torch.Tensor:
    """Per-dimension rms(decoder word embeddings) / rms(compressed states), fp32 [D].

    model: an ``AutoRegEmbedModel``; batches: ``batches.CompressionBatch`` objects.
    The word-embedding RMS is over the decoder's whole vocabulary (a frequency-weighted RMS was
    tried and trained worse: docs/experiments.md).
    """
    e_sq, n_e = None, 0
    for b in batches:
        e = model.compress(b.input_ids, b.attention_mask).float().flatten(0, 1)
        e_sq = e.pow(2).sum(0) + (0 if e_sq is None else e_sq)
        n_e += e.shape[0]
    if not n_e:
        raise InputError("decoder scale: no stage-1 rows to measure on")
    weight = model.decoder.get_input_embeddings().weight
    with D.gathered([weight]):
        word_rms = weight.float().pow(2).mean(0).sqrt()
    return (word_rms.to(e_sq.device) / (e_sq / n_e).sqrt().clamp_min(1e-12)).cpu()


def rescale_final_norm(encoder: nn.Module, factors: torch.Tensor):
    """Multiply the final norm's weight by ``factors`` in place.  Call it before the optimizer
    exists (ZeRO keeps its own fp32 master copy once the engine is built).  Under ZeRO-3 the
    weight is gathered, changed on rank 0 and re-partitioned from there."""
    weight = final_norm(encoder).weight
    with D.gathered([weight], modifier_rank=0):
        if weight.shape != factors.shape:
            raise InputError(f"decoder scale: final norm has shape {tuple(weight.shape)}, "
                             f"factors {tuple(factors.shape)}")
        weight.data.copy_((weight.data.float() * factors.to(weight.device)).to(weight.dtype))
