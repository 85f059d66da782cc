"""LoRA on the encoder (``model.lora_rank > 0``), and merging it back for export.

Each training stage adds fresh adapters to the encoder it starts from and exports the
*merged* weights, so the stage-1 export is a plain model: reference scoring reads it as
is, stage 2 adds new adapters on top of it, and users load every export with
``AutoModel.from_pretrained``.  A stage that starts from an export also hands over its
adapters alone, in PEFT's layout (``adapter_parameters``, ``adapter_config``), over that export.
Adapters are injected in place (the encoder stays a ``LlamaModel``-like module), so the rest of
the trainer does not know they are there.

Under ZeRO-3 the adapters are created after the base weights were partitioned;
``deepspeed.initialize`` partitions them too.  The merge gathers a layer's base weight and
its two adapter matrices together, one layer at a time.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import InputError

ADAPTER = "default"


def add_lora(encoder: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: str) -> torch.nn.Module:
    """Inject LoRA into ``targets`` ("all-linear" or comma-separated module names) and
    freeze everything else, the EMBED token embeddings included (as the authors do)."""
    from peft import LoraConfig, inject_adapter_in_model

    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=target_modules,
                        bias="none")
    try:
        inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    except ValueError as e:  # peft's message does not name our key
        raise InputError(f"model.lora_targets={targets!r}: {e}") from None
    for name, p in encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return encoder


@contextlib.contextmanager
def adapters_disabled(encoder: torch.nn.Module):
    """The encoder without its adapters: in stage 2 that is the merged stage-1 model, exactly."""
    layers = list(_lora_layers(encoder).values())
    if not layers:
        raise InputError("the encoder has no LoRA adapters to disable (model.lora_rank = 0)")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield encoder
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # also restores the adapters' requires_grad


def _lora_layers(encoder: torch.nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in encoder.named_modules() if isinstance(m, LoraLayer)}


def exported_parameters(encoder: torch.nn.Module):
    """(name in the plain model, parameters to gather, function returning the full tensor).

    Plain parameters pass through; a LoRA layer's weight becomes W + scaling * B @ A (in
    fp32, cast back to W's dtype) under the name the layer had before injection.  Adapter
    matrices themselves are not exported.
    """
    layers = _lora_layers(encoder)
    for name, p in encoder.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer") and owner[: -len(".base_layer")] in layers:
            layer_name = owner[: -len(".base_layer")]
            layer = layers[layer_name]
            if leaf != "weight":
                yield f"{layer_name}.{leaf}", [p], p.detach
                continue
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            scaling = layer.scaling[ADAPTER]

            def merged(w=p, a=a, b=b, s=scaling):
                return (w.detach().float() + s * (b.detach().float() @ a.detach().float())).to(w.dtype)

            yield f"{layer_name}.weight", [p, a, b], merged
        else:
            yield name, [p], p.detach


def adapter_parameters(encoder: torch.nn.Module):
    """(name in PEFT's saved layout, parameter) of every adapter matrix: ``<layer>.lora_A.default.weight``
    is saved as ``base_model.model.<layer>.lora_A.weight``, which ``PeftModel`` and Transformers'
    adapter loading read."""
    for name, p in encoder.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield "base_model.model." + name.replace(f".{ADAPTER}.", "."), p


def adapter_config(encoder: torch.nn.Module, base: str):
    """The ``peft.LoraConfig`` of the encoder's adapters over the model folder or hub name ``base`` (its
    ``save_pretrained`` writes adapter_config.json): the wrapped layers by name, their rank, alpha and
    dropout as injected."""
    from peft import LoraConfig

    layers = _lora_layers(encoder)
    if not layers:
        raise InputError("the encoder has no LoRA adapters to export (model.lora_rank = 0)")
    one = next(iter(layers.values()))
    rank, scaling = one.r[ADAPTER], one.scaling[ADAPTER]
    dropout = getattr(one.lora_dropout[ADAPTER], "p", 0.0)
    config = LoraConfig(r=rank, lora_alpha=scaling * rank, lora_dropout=dropout, target_modules=sorted(layers),
                        bias="none", base_model_name_or_path=base, inference_mode=True)
    return config
