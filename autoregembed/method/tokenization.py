"""The tokenisation contract (see DEVELOPERS.md), in one place.

Encoder input:  [BOS] tok(text)[:budget] tok("\\n" + instruction + "\\n") <EMBED0>..<EMBED{k-1}>
                right-padded, so the k EMBED tokens sit right after each row's last real token.
Decoder input:  [BOS] e_1..e_k tok(target)[:max_target_len] [EOS] as embeddings, the BOS only with
                ``model.decoder_bos`` (``decoder_layout``), and with ``model.shared_prefix`` the
                shared vectors after e_k (shared_prefix.py); labels are -100 on the prefix, i.e.
                position prefix-1+t predicts target token t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .logprobs import IGNORE_INDEX
from ..ground.errors import InputError


def embed_token_names(k: int) -> list[str]:
    return [f"<EMBED{i}>" for i in range(k)]


def input_template(k: int) -> str:
    """The encoder input as text, for readers of an export (``TextEncoder.encoder_ids`` builds it)."""
    return "[BOS]{text}\n{instruction}\n" + "".join(embed_token_names(k))


def prepare_tokenizer(tokenizer, k: int):
    """Add the k EMBED special tokens (idempotent) and make sure a pad token exists."""
    names = embed_token_names(k)
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": names}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise InputError("the tokenizer needs both a BOS and an EOS token")
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = int(1e30)  # TextEncoder applies the budgets; an export's own limit is for others
    return tokenizer


@dataclass
class TextEncoder:
    """Turns (text, instruction) pairs and targets into padded id tensors.  ``max_positions``: the
    model's positions (``max_position_embeddings``; None: unchecked), which every instruction must
    leave room in for a whole text budget."""

    tokenizer: object
    k: int
    max_text_len: int = 256
    max_target_len: int = 256
    max_positions: int | None = None

    def __post_init__(self):
        self.embed_ids = self.tokenizer.convert_tokens_to_ids(embed_token_names(self.k))
        if any(i is None or i == self.tokenizer.unk_token_id for i in self.embed_ids):
            raise ValueError(f"tokenizer lacks the EMBED tokens; call prepare_tokenizer(tokenizer, {self.k})")
        self._tails: dict[str, list[int]] = {}  # instruction -> its checked ids

    def _ids(self, s: str) -> list[int]:
        return self.tokenizer(s, add_special_tokens=False)["input_ids"]

    def instruction_ids(self, instruction: str, key: str = "instruction") -> list[int]:
        """The ids of "\n" instruction "\n", refused (InputError naming ``key``) when it holds a special
        token (a literal <EMBED0> is read as the token itself, so the EMBED tokens would no longer be only
        the last k: the sentence-transformers pooling and the encoder would read different states) or
        leaves no room for a whole text in the model's positions (the embedding would collapse)."""
        tail = self._tails.get(instruction)
        if tail is not None:
            return tail
        tail = self._ids("\n" + instruction + "\n")
        special = sorted(set(tail) & set(self.tokenizer.all_special_ids))
        if special:
            names = ", ".join(self.tokenizer.convert_ids_to_tokens(special))
            raise InputError(f"{key}: holds the special token(s) {names}, which only the encoder may place; "
                             f"write the instruction without them")
        room = None if self.max_positions is None else self.max_positions - 1 - self.max_text_len - self.k
        if room is not None and len(tail) > room:
            raise InputError(f"{key}: {len(tail)} tokens (with its two newlines), but the model's "
                             f"{self.max_positions} positions leave {max(room, 0)} beside BOS, a text of up to "
                             f"data.max_text_len={self.max_text_len} tokens and {self.k} EMBED tokens; shorten it "
                             f"(or lower data.max_text_len)")
        self._tails[instruction] = tail
        return tail

    def encoder_ids(self, text: str, instruction: str) -> list[int]:
        tail = self.instruction_ids(instruction)
        return [self.tokenizer.bos_token_id] + self.read_ids(text)[0] + tail + list(self.embed_ids)

    def target_ids(self, target: str) -> list[int]:
        return self._ids(target)[: self.max_target_len] + [self.tokenizer.eos_token_id]

    def read_ids(self, text: str) -> tuple[list[int], bool]:
        """The tokens of ``text`` the encoder reads (``encoder_ids`` cuts it to ``max_text_len``), and
        whether that cut any."""
        ids = self._ids(text)
        return ids[: self.max_text_len], len(ids) > self.max_text_len

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists; returns (ids, attention_mask)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def encode_inputs(self, texts: list[str], instructions: list[str]) -> dict:
        ids, mask = self.pad([self.encoder_ids(t, i) for t, i in zip(texts, instructions)])
        return {"input_ids": ids, "attention_mask": mask}

    def encode_targets(self, targets: list[str]) -> dict:
        ids, mask = self.pad([self.target_ids(t) for t in targets])
        return {"target_ids": ids, "target_mask": mask}


@dataclass
class DecoderLayout:
    """Where the compressed tokens go in the decoder's input, and what each position predicts."""

    ids: torch.Tensor  # [BOS] + target ids: embedded in one call, e_1..e_k spliced in after n_bos
    n_bos: int
    attention_mask: torch.Tensor  # [S, n_bos + k + T]
    labels: torch.Tensor  # [S, n_bos + k + T], IGNORE_INDEX where nothing is predicted


def decoder_layout(target_ids: torch.Tensor, target_mask: torch.Tensor, k: int, bos_id: int | None) -> DecoderLayout:
    """The decoder reads [BOS] e_1..e_k target+EOS (no BOS when ``bos_id`` is None)."""
    n_bos = 0 if bos_id is None else 1
    ids = torch.nn.functional.pad(target_ids, (n_bos, 0), value=bos_id if n_bos else 0)
    prefix = n_bos + k
    ones = torch.ones((target_ids.shape[0], prefix), dtype=target_mask.dtype, device=target_mask.device)
    return DecoderLayout(ids, n_bos, torch.cat([ones, target_mask], dim=1), decoder_labels(target_ids, target_mask, prefix))


def decoder_labels(target_ids: torch.Tensor, target_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Labels aligned with decoder positions [prefix ; target+EOS], already shifted; ``k`` is
    the prefix length (e_1..e_k, plus one when the decoder reads a BOS first).

    Position p predicts the token at p+1, so label[p] = target[p-k+1] for p >= k-1 and the
    last position (fed the EOS embedding) predicts nothing.  Padding is IGNORE_INDEX.
    """
    n, t = target_ids.shape
    labels = torch.full((n, k + t), IGNORE_INDEX, dtype=torch.long, device=target_ids.device)
    labels[:, k - 1 : k - 1 + t] = torch.where(target_mask.bool(), target_ids, IGNORE_INDEX)
    return labels
