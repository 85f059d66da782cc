"""The one optimizer step every trainer path runs: the training loop (trainer.train_stage), the ZeRO-3
parity test, gpu_check and the benchmarks.

Why one: gradient accumulation, the online reference values and DeepSpeed's step boundary are where a
hand-written loop drifts from the product; a test or a measurement of another loop proves nothing
about the trainer.
"""
from __future__ import annotations

import torch

from ..ground import distributed as D
from ..method.batches import to_device
from .refscores import online_references


def micro_step(engine, batch, loss_fn, online: bool = False, after_backward=None) -> torch.Tensor:
    """One micro-batch of training, the one every trainer path runs (stages, parity test, benchmarks):
    its online reference values (``online``), forward, loss, backward and DeepSpeed's step, which
    updates the weights at the accumulation boundary.  ``after_backward(engine)`` runs between backward
    and step (gradients are whole then).  Returns the loss, detached, on the device."""
    if online:
        batch = online_references(engine, batch)
    loss = loss_fn(engine(batch), batch)
    engine.backward(loss)
    if after_backward is not None:
        after_backward(engine)
    engine.step()
    return loss.detach()


def optimizer_step(engine, batches, loss_fn, online: bool = False, after_backward=None) -> torch.Tensor:
    """One optimizer step, the one the trainer, the parity test, gpu_check and the benchmarks run:
    ``batches``, the step's micro-batches on the host (as many as the engine's gradient accumulation
    steps: DeepSpeed updates the weights after the last), each moved to the device and run through
    ``micro_step``.  Returns the mean loss on the device: nothing here waits for the GPU."""
    total, n = 0.0, 0
    for batch in batches:
        total = total + micro_step(engine, to_device(batch, D.device()), loss_fn, online, after_backward)
        n += 1
    if n != engine.gradient_accumulation_steps():
        raise ValueError(f"{n} micro-batches for a step of {engine.gradient_accumulation_steps()}")
    return total / n
