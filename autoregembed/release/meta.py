"""``autoregembed.json``, the description an export carries: read and written here only."""
from __future__ import annotations

import dataclasses
import json
import os

from ..method.tokenization import embed_token_names, input_template
from ..ground.atomic import atomic_write_text
from ..ground.errors import InputError, MissingInputError

META_FILE = "autoregembed.json"


@dataclasses.dataclass(frozen=True)
class ExportMeta:
    """``autoregembed.json``: what an exported encoder needs to embed text (k, the instruction,
    the text budget) and where it came from.  The one reader and writer of that file."""

    num_embed_tokens: int
    instruction: str  # the default; instructions.prompts(meta) is the export's whole table
    max_text_len: int = 512
    stage: str | None = None
    base_model: str | None = None
    decoder_bos: bool = False  # provenance: what the decoder read in training
    query_instruction: str | None = None  # encode_query's instruction (None: ``instruction``)
    document_instruction: str | None = None  # encode_document's instruction (None: ``instruction``)
    shared_prefix: int = 0  # vectors of the decoder's shared prefix, in shared_prefix.PREFIX_FILE beside the model
    pooled: list[int] | None = None  # the e_i (1-based) the embedding averages (eval.pooling); None: all k
    training: dict | None = None  # provenance for the model card: data files, steps, optimiser, loss
    evaluation: dict | None = None  # the last STS result of this export (evaluate.sts_report), for the card

    def write(self, folder: str):
        record = {**dataclasses.asdict(self), "template": input_template(self.num_embed_tokens)}
        atomic_write_text(os.path.join(folder, META_FILE), json.dumps(record, indent=2))  # also rewritten in place

    @classmethod
    def read(cls, folder: str) -> "ExportMeta":
        path = os.path.join(folder, META_FILE)
        if not os.path.exists(path):
            raise MissingInputError(f"{folder}: not an autoregembed export (no {META_FILE})")
        try:
            with open(path) as f:
                record = json.load(f)
            known = {f.name for f in dataclasses.fields(cls)}
            meta = cls(**{k: v for k, v in record.items() if k in known})
            if not isinstance(meta.num_embed_tokens, int) or not isinstance(meta.instruction, str):
                raise TypeError("num_embed_tokens must be an integer and instruction a string")
            if not all(isinstance(x, (str, type(None))) for x in (meta.query_instruction, meta.document_instruction)):
                raise TypeError("query_instruction and document_instruction must be strings or null")
            if meta.num_embed_tokens < 1:
                raise ValueError(f"num_embed_tokens must be >= 1, got {meta.num_embed_tokens}")
            if meta.pooled is not None and not (
                    isinstance(meta.pooled, list) and meta.pooled and len(set(meta.pooled)) == len(meta.pooled)
                    and all(isinstance(i, int) and 1 <= i <= meta.num_embed_tokens for i in meta.pooled)):
                raise ValueError(f"pooled must be null or distinct positions in 1..{meta.num_embed_tokens}, "
                                 f"got {meta.pooled!r}")
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{path}: not a valid autoregembed export description ({e})") from None
        return meta

    @property
    def pooled_positions(self) -> list[int] | None:
        """``pooled`` 0-based, as ``model.pool_embedding`` takes it."""
        return None if self.pooled is None else sorted(i - 1 for i in self.pooled)

    def check_tokenizer(self, folder: str, tokenizer):
        """The export's tokenizer must hold the k EMBED tokens its description names: a k that
        disagrees would add rows the model does not have (or read the wrong positions)."""
        vocab = tokenizer.get_vocab()
        have = sum(1 for name in embed_token_names(self.num_embed_tokens + 1) if name in vocab)
        if have != self.num_embed_tokens:
            raise InputError(f"{os.path.join(folder, META_FILE)}: num_embed_tokens = {self.num_embed_tokens} but the "
                             f"export's tokenizer has {have} EMBED tokens")
