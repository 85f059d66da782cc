"""Consolidate the (possibly ZeRO-3 sharded) encoder into a Hugging Face folder.

The folder loads with plain ``transformers.AutoModel.from_pretrained``, with
``autoregembed.Encoder.from_pretrained`` and with ``sentence_transformers.SentenceTransformer``:
sharded safetensors + index, config, the tokenizer with its EMBED tokens,
``autoregembed.json`` (k and instructions) and the sentence-transformers modules (st_format.py).
Parameters are gathered one at a time (a LoRA layer with its adapters, merged; see
lora.py) and shards are flushed as they fill, so rank 0 never holds more than one shard
plus one layer.  Written atomically.

``export_adapter`` writes a LoRA-trained encoder's adapters alone, in PEFT's layout over the export it
started from, with the same tokenizer, description and sentence-transformers files: the same three
loaders read it (Transformers' PEFT integration loads the base and applies the adapters), at the
size of the adapters (megabytes, not the 13.5 GB of a merged 7B export).
"""
from __future__ import annotations

import contextlib
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..ground import distributed as D
from ..ground.atomic import atomic_dir
from ..ground.errors import StorageError, UserError
from ..ground.lora import adapter_config, adapter_parameters, exported_parameters
from ..ground.monitor import Progress
from ..method.shared_prefix import PREFIX_FILE, write_prefix
from .meta import ExportMeta
from .model_card import CARD_FILE, card_text
from .st_format import write_sentence_transformers

class _ShardWriter:
    def __init__(self, folder: str, max_shard_bytes: int):
        self.folder, self.max = folder, max_shard_bytes
        self.buffer, self.size, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max:
            self.flush()
        self.buffer[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def flush(self):
        if not self.buffer:
            return
        fname = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.buffer, os.path.join(self.folder, fname), metadata={"format": "pt"})
        self.files.append(fname)
        self.weight_map.update({k: fname for k in self.buffer})
        self.buffer, self.size = {}, 0

    def finish(self):
        self.flush()
        n = len(self.files)
        renames = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(self.files)}
        for old, new in renames.items():
            os.rename(os.path.join(self.folder, old), os.path.join(self.folder, new))
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: renames[v] for k, v in sorted(self.weight_map.items())}}
        with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)


def export_encoder(encoder: torch.nn.Module, tokenizer, out_dir: str, meta: ExportMeta,
                   max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None,
                   shared_prefix: torch.Tensor | None = None):
    """Every rank must call this (the gathers are collective); rank 0 writes ``out_dir``, with the
    decoder's ``shared_prefix`` (shared_prefix.py) when the model was trained with one."""
    is_writer = D.rank() == 0
    try:
        _write_export(encoder, tokenizer, out_dir, meta, max_shard_bytes, dtype, is_writer, shared_prefix)
    except (OSError, SafetensorError) as e:  # a full disk, a read-only folder: atomic_dir kept the old export
        if isinstance(e, UserError):
            raise
        raise StorageError(f"{out_dir}: writing the export failed ({e}); any earlier export there is "
                           f"intact") from e
    D.barrier()
    return out_dir


def _write_export(encoder, tokenizer, out_dir: str, meta: ExportMeta, max_shard_bytes: int, dtype, is_writer: bool,
                  shared_prefix: torch.Tensor | None):
    ctx = atomic_dir(out_dir) if is_writer else contextlib.nullcontext()
    with ctx as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes) if is_writer else None
        tensors = list(exported_parameters(encoder))
        progress = Progress(f"export {os.path.basename(os.path.dirname(os.path.abspath(out_dir)))}", len(tensors),
                            "tensors")
        for n, (name, params, full) in enumerate(tensors, 1):
            with D.gathered(params):
                if is_writer:
                    t = full()
                    t = t.to("cpu", dtype=dtype or t.dtype).clone().contiguous()
                    if t.numel() == 0:
                        raise RuntimeError(f"export: parameter {name} is empty after gathering")
                    writer.add(name, t)
            progress.update(n)
        if is_writer:
            writer.finish()
            config = encoder.config
            config.architectures = [type(encoder).__name__]
            config.vocab_size = encoder.get_input_embeddings().num_embeddings
            config.use_cache = False
            config.save_pretrained(tmp)
            _write_companions(tmp, out_dir, tokenizer, meta, config.hidden_size, shared_prefix)


def _write_companions(tmp: str, out_dir: str, tokenizer, meta: ExportMeta, hidden_size: int,
                      shared_prefix: torch.Tensor | None):
    """What every export holds beside its weights: the tokenizer, autoregembed.json, the decoder's shared
    prefix (if any), the sentence-transformers files and the model card."""
    tokenizer.save_pretrained(tmp)
    meta.write(tmp)
    if shared_prefix is not None:
        write_prefix(os.path.join(tmp, PREFIX_FILE), shared_prefix)
    write_sentence_transformers(tmp, tokenizer, meta, hidden_size)
    with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
        f.write(card_text(out_dir, meta))


def export_adapter(encoder: torch.nn.Module, tokenizer, out_dir: str, meta: ExportMeta, base: str,
                   shared_prefix: torch.Tensor | None = None) -> str:
    """The encoder's LoRA adapters alone into ``out_dir`` (adapter_model.safetensors + adapter_config.json
    naming ``base``, the export they sit on), with the files every export holds.  Every rank must call
    it (the gathers are collective); rank 0 writes, atomically."""
    is_writer = D.rank() == 0
    try:
        with atomic_dir(out_dir) if is_writer else contextlib.nullcontext() as tmp:
            tensors = {}
            for name, p in adapter_parameters(encoder):
                with D.gathered([p]):
                    if is_writer:
                        tensors[name] = p.detach().to("cpu").clone().contiguous()
            if is_writer:
                save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
                adapter_config(encoder, base).save_pretrained(tmp)
                _write_companions(tmp, out_dir, tokenizer, meta, encoder.config.hidden_size, shared_prefix)
    except (OSError, SafetensorError) as e:
        if isinstance(e, UserError):
            raise
        raise StorageError(f"{out_dir}: writing the adapter export failed ({e}); any earlier one there is intact") from e
    D.barrier()
    return out_dir
