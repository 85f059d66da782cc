"""A model's architecture as its shapes (``Arch``): what the memory planner sizes, the DeepSpeed config's
buckets are derived from, and the trainer's throughput counts FLOPs with; from a Hugging Face
config.json, a model folder or a preset name."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .errors import InputError

PRESETS = {  # (hidden, layers, intermediate, vocab, heads, kv_heads, tied)
    "llama-2-7b": (4096, 32, 11008, 32000, 32, 32, False),
    "llama-2-13b": (5120, 40, 13824, 32000, 40, 40, False),
    "mistral-7b": (4096, 32, 14336, 32000, 32, 8, False),
    "llama-3-8b": (4096, 32, 14336, 128256, 32, 8, False),
    "qwen2-7b": (3584, 28, 18944, 152064, 28, 4, False),
    "smollm2-135m": (576, 30, 1536, 49152, 9, 3, True),
}


@dataclass
class Arch:
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool

    @classmethod
    def load(cls, name_or_path: str) -> "Arch":
        if name_or_path.lower() in PRESETS:
            return cls(*PRESETS[name_or_path.lower()])
        path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
        if not os.path.exists(path):
            raise InputError(f"--model: {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) "
                             f"nor a config.json / model folder")
        with open(path) as f:
            return cls.from_config(json.load(f))

    @classmethod
    def from_config(cls, c: dict) -> "Arch":
        """From a Hugging Face config (config.json contents or ``PretrainedConfig.to_dict()``)."""
        return cls(c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"],
                   c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                   bool(c.get("tie_word_embeddings", False)))

    def layer_params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    def params(self, extra_tokens: int = 0, with_head: bool = True) -> int:
        embed = (self.vocab + extra_tokens) * self.hidden
        head = 0 if (self.tied or not with_head) else self.vocab * self.hidden
        return embed + self.layers * self.layer_params() + self.hidden + head

    def largest_layer(self, extra_tokens: int = 0) -> int:
        """The largest single module's parameters (how DeepSpeed sizes its gather buffer)."""
        return max((self.vocab + extra_tokens) * self.hidden, self.hidden * self.intermediate)
