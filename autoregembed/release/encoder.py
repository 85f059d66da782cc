"""Inference on an exported model: ``Encoder.from_pretrained(path).encode(texts)``.

``encode(sentences, batch_size=..., **kwargs)`` (sentence-transformers' and MTEB 1.x's call)
returns a numpy array of L2-normalised embeddings (compare by cosine / dot product); MTEB 2 calls
``mteb_model.AutoRegEmbedMTEB``, which wraps this.
"""
from __future__ import annotations


import numpy as np
import torch

from ..ground.errors import InputError
from .meta import ExportMeta
from .instructions import prompts as export_prompts
from ..method.packing import sdpa_without_cudnn
from ..method.model import compressed_states, pool_embedding, pooled_positions
from ..method.tokenization import TextEncoder, prepare_tokenizer


class Encoder:
    def __init__(self, model, tokenizer, k: int, instruction: str, max_text_len: int = 512,
                 prompts: dict[str, str] | None = None, pooled: list[int] | None = None):
        """prompts: the export's instruction table (instructions.py); "query" and "document" are
        what ``encode_query`` and ``encode_document`` use.  pooled: the 0-based e_i the embedding
        averages (None: all k)."""
        self.model = model.eval()
        self.k = k
        self.pooled = pooled
        self.instruction = instruction
        self.prompts = {"query": instruction, "document": instruction, **(prompts or {})}
        self.text_encoder = TextEncoder(tokenizer, k, max_text_len=max_text_len,
                                        max_positions=getattr(model.config, "max_position_embeddings", None))
        for name, text in self.prompts.items():  # each refused at load, not as collapsed embeddings later
            self.text_encoder.instruction_ids(text, f"the instruction {name!r}")
        self.text_encoder.instruction_ids(instruction)

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype: torch.dtype | None = None,
                        max_text_len: int | None = None, pooling: str | None = None):
        """pooling: an ``eval.pooling`` value in place of the export's own (to try one without retraining)."""
        from transformers import AutoTokenizer

        meta = ExportMeta.read(path)
        pooled = _pooled(meta, pooling)
        tokenizer = AutoTokenizer.from_pretrained(path)
        meta.check_tokenizer(path, tokenizer)
        tokenizer = prepare_tokenizer(tokenizer, meta.num_embed_tokens)
        return cls(_load(path, device, dtype), tokenizer, meta.num_embed_tokens, meta.instruction,
                   max_text_len or meta.max_text_len, export_prompts(meta), pooled)

    @classmethod
    def untrained(cls, base: str, meta: ExportMeta, device: str | None = None, dtype: torch.dtype | None = None,
                  pooling: str | None = None):
        """The base model before any training, reading text as the export ``meta`` describes it (its k EMBED
        tokens added, with the instruction, text budget and pooling of ``meta``, or ``pooling``): the floor a
        trained model must beat.  The new EMBED rows get the vocabulary's mean (``resize_token_embeddings``;
        its draw is seeded and leaves the global RNG as it was, so the floor is one number per base)."""
        from transformers import AutoTokenizer

        pooled = _pooled(meta, pooling)
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base), meta.num_embed_tokens)
        model = _load(base, device, dtype)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(len(tokenizer))
        return cls(model, tokenizer, meta.num_embed_tokens, meta.instruction, meta.max_text_len,
                   export_prompts(meta), pooled)

    def encode_query(self, sentences, **kwargs):
        """``encode`` with the export's query instruction (sentence-transformers' ``encode_query``)."""
        return self.encode(sentences, **{"instruction": self.prompts["query"], **kwargs})

    def encode_document(self, sentences, **kwargs):
        """``encode`` with the export's document instruction (sentence-transformers' ``encode_document``)."""
        return self.encode(sentences, **{"instruction": self.prompts["document"], **kwargs})

    @torch.no_grad()
    def encode(self, sentences, batch_size: int = 32, instruction: str | None = None,
               show_progress_bar: bool = False, convert_to_numpy: bool = True, **kwargs):
        """Embeddings [len(sentences), D], L2-normalised.  show_progress_bar: True, a tqdm bar; a name, the
        trainer's own progress line under that name (``monitor.Progress``).  Extra keyword arguments are
        accepted and ignored."""
        if isinstance(sentences, str):
            sentences = [sentences]
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, str)), None)
        if bad is not None:
            raise TypeError(f"sentences[{bad}] is {type(sentences[bad]).__name__}, not str")
        instruction = self.instruction if instruction is None else instruction
        device = next(self.model.parameters()).device
        order = np.argsort([-len(s) for s in sentences])  # length-sorted batches pad less
        out = [None] * len(sentences)
        batches, progress = range(0, len(sentences), batch_size), None
        if isinstance(show_progress_bar, str):
            from ..ground.monitor import Progress

            progress = Progress(show_progress_bar, len(batches), "batches")
        elif show_progress_bar:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        for n, start in enumerate(batches, 1):
            idx = order[start : start + batch_size]
            enc = self.text_encoder.encode_inputs([sentences[i] for i in idx], [instruction] * len(idx))
            mask = enc["attention_mask"].to(device)
            hidden = self.model(input_ids=enc["input_ids"].to(device), attention_mask=mask).last_hidden_state
            emb = pool_embedding(compressed_states(hidden, mask, self.k), self.pooled).cpu()
            for j, i in enumerate(idx):
                out[i] = emb[j]
            if progress is not None:
                progress.update(n)
        dim = self.model.config.hidden_size
        emb = torch.stack(out) if out else torch.empty((0, dim))
        return emb.numpy() if convert_to_numpy else emb


def _pooled(meta: ExportMeta, pooling: str | None) -> list[int] | None:
    """The 0-based e_i an embedding averages: the export's own, or ``pooling`` (an eval.pooling value)."""
    try:
        return meta.pooled_positions if pooling is None else pooled_positions(pooling, meta.num_embed_tokens)
    except ValueError as e:
        raise InputError(f"pooling: {e}") from None


def _load(path: str, device: str | None, dtype: torch.dtype | None):
    """The bare transformer (no LM head) of a model folder or hub name, on ``device`` (default: CUDA if present)."""
    from transformers import AutoModel

    sdpa_without_cudnn()  # Transformers' default attention is SDPA
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AutoModel.from_pretrained(path, dtype=dtype or "auto").to(device)
