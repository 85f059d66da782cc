"""DeepSpeed JSON: fill the "auto" values from the YAML and refuse values that contradict it.

"auto" is an HF-Trainer convention that DeepSpeed itself does not understand, so every
auto is resolved here before ``deepspeed.initialize``.
"""
from __future__ import annotations

import copy
import json
import os

import torch

from .config import ConfigError, OptimConfig
from ..ground.arch import Arch


def _fill(section: dict, key: str, value, where: str):
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(f"DeepSpeed config {where}{key} = {current!r} contradicts the YAML ({value!r}); "
                          f"set it to \"auto\" or change the YAML")


def bucket_sizes(arch: Arch, gpus_per_node: int) -> dict:
    """ZeRO sizes (in parameters) for "auto".  The HF Trainer's 0.9 x hidden^2 prefetch bucket is
    smaller than one 7B MLP matrix (hidden x intermediate), so nothing is fetched ahead; here the
    prefetch covers one whole transformer layer and the reduce bucket the largest matrix in it."""
    h = arch.hidden
    return {"reduce_bucket_size": max(h * h, h * arch.intermediate),
            "stage3_prefetch_bucket_size": arch.layer_params(),
            "stage3_param_persistence_threshold": 10 * h,
            "zero_hpz_partition_size": gpus_per_node}


def read_ds_config(path: str | dict) -> tuple[dict, str]:
    """(the DeepSpeed JSON as a dict, its name for messages); checked before any model loads."""
    if isinstance(path, dict):
        ds, name = copy.deepcopy(path), "<dict>"
    else:
        if not os.path.isfile(path):
            raise ConfigError(f"--deepspeed: {path} is a folder, not a DeepSpeed JSON file" if os.path.isdir(path)
                              else f"--deepspeed: no such file {path}")
        with open(path) as f:
            try:
                ds = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: bad JSON ({e.msg})") from None
        name = path
    if not isinstance(ds, dict):
        raise ConfigError(f"{name}: the top level must be a JSON object")
    if "scheduler" in ds:
        raise ConfigError(f"{name}: remove 'scheduler'; autoregembed schedules the learning rate from "
                          f"warmup_steps and max_steps in the YAML")
    return ds, name


def build_ds_config(path: str | dict, optim: OptimConfig, world_size: int, arch: Arch,
                    dtype: torch.dtype, gpus_per_node: int = 1) -> dict:
    """The DeepSpeed config with every "auto" resolved; ``arch`` sizes the ZeRO buckets and
    ``gpus_per_node`` the hierarchical (hpZ) partition of ds_configs/zero3_multinode.json."""
    ds, name = read_ds_config(path)
    _fill(ds, "train_micro_batch_size_per_gpu", optim.micro_batch_size, "")
    _fill(ds, "gradient_accumulation_steps", optim.gradient_accumulation_steps, "")
    _fill(ds, "train_batch_size", optim.micro_batch_size * optim.gradient_accumulation_steps * world_size, "")
    _fill(ds, "gradient_clipping", optim.gradient_clipping, "")
    for key, on in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        sec = ds.setdefault(key, {})
        _fill(sec, "enabled", on, f"{key}.")
    zero = ds.setdefault("zero_optimization", {})
    for key, value in bucket_sizes(arch, gpus_per_node).items():
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", optim.learning_rate, "optimizer.params.")
        _fill(params, "weight_decay", optim.weight_decay, "optimizer.params.")
        for key, value in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
            if params.get(key) == "auto":
                params[key] = value
    else:
        ds["zero_allow_untested_optimizer"] = True
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{name}: cannot resolve \"auto\" for {', '.join(leftover)}")
    validate(ds, name)
    return ds


def validate(ds: dict, name: str):
    """DeepSpeed's own parse of a resolved config (its pydantic sections), so a value DeepSpeed
    refuses (``zero_optimization.stage: 7``) fails as a ConfigError before any model loads, not in
    ``deepspeed.initialize`` minutes later.  The batch product is ours (``_fill`` checked it against
    the world size): it is left out, as DeepSpeed's world size here may not be the run's yet."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = copy.deepcopy(ds)
    parsed.pop("train_batch_size", None)
    try:
        DeepSpeedConfig(parsed)
    except Exception as e:  # pydantic's ValidationError, DeepSpeed's asserts and ValueErrors
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "errors.pydantic" not in line]
        raise ConfigError(f"{name}: DeepSpeed refuses it: {'; '.join(lines) or type(e).__name__}") from None


def check_early(path: str | dict, optims: dict, world_size: int, arch: Arch, dtype: torch.dtype) -> None:
    """Resolve and validate the DeepSpeed file for each training stage's optimiser settings
    (``optims``: stage -> OptimConfig) before anything loads: contradictions with the YAML and
    values DeepSpeed refuses are reported now.  ``arch`` only sizes the bucket "auto"s."""
    read_ds_config(path)
    for optim in optims.values():
        build_ds_config(path, optim, world_size, arch, dtype)


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
