"""``autoregembed reconstruct``: what an embedding remembers of its text.

The frozen decoder (the export's base model) reads a text's k compressed tokens exactly as in
training (``tokenization.decoder_layout``) and (1) regenerates the text greedily from them alone,
(2) predicts each token of the text given the true tokens before it: the token accuracy is the
share of those predictions that are right, and (3) the information gap: how much more likely the text
is given its own compressed tokens than given their mean over every text asked (the quantity stage 1
logs, diagnostics.py, on any texts: a user's own domain included). A model that compresses regenerates
recognisable text; one whose compressed tokens are a shared prefix writes the same generic sentence
for every input, and its gap is near 0.
"""
from __future__ import annotations

import os

import torch

from .encoder import Encoder
from ..ground.errors import InputError, MissingInputError
from ..method.model import compressed_states
from ..method.shared_prefix import with_shared_prefix
from ..method.tokenization import IGNORE_INDEX, decoder_layout


def decoder_path(export_dir: str, given: str | None) -> str:
    """The frozen decoder of an export: ``given``, else the base model its metadata names (the
    built-in tiny base is the ``base`` folder of the run that exported it)."""
    from .meta import ExportMeta

    if given:
        return given
    base = ExportMeta.read(export_dir).base_model
    if base == "tiny":
        base = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(export_dir))), "base")
        if not os.path.isdir(base):
            raise MissingInputError(f"{export_dir}: its tiny base model is not at {base}; pass --decoder")
    if not base:
        raise InputError(f"{export_dir}: the export does not name its base model; pass --decoder")
    return base


def load_decoder(path: str, device):
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    decoder.config.use_cache = True
    return decoder


class ExportReconstructor:
    """An export and the frozen decoder it was trained against, read as training laid them out (the
    metadata's ``decoder_bos``, the export's shared prefix): ``autoregembed reconstruct`` and
    bench/doc_gap.py both measure through it, so the two cannot lay the decoder out differently."""

    def __init__(self, export_dir: str, decoder: str | None = None):
        from ..method.shared_prefix import read_prefix
        from .meta import ExportMeta

        self.decoder_path = decoder_path(export_dir, decoder)  # bad paths fail before a model loads
        self.decoder_bos = ExportMeta.read(export_dir).decoder_bos
        self.encoder = Encoder.from_pretrained(export_dir, dtype=torch.float32)
        self.decoder = load_decoder(self.decoder_path, next(self.encoder.model.parameters()).device)
        self.shared_prefix = read_prefix(export_dir)

    def __call__(self, texts: list[str], instruction: str | None = None, max_new_tokens: int = 64) -> list[dict]:
        """``reconstruct`` of ``texts`` (one dict per text)."""
        return reconstruct(self.encoder, self.decoder, texts, instruction, self.decoder_bos, max_new_tokens,
                           shared_prefix=self.shared_prefix)


@torch.no_grad()
def teacher_forced(decoder, e: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor,
                   bos_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: how many target tokens (EOS included) the decoder's argmax predicts right given e and
    the true tokens before them, how many it predicts, and their summed log-probability. The layout is
    training's. One row at a time through the vocabulary (a diagnostic's few rows: [T, vocab] at once)."""
    embed = decoder.get_input_embeddings()
    lay = decoder_layout(target_ids, target_mask, e.shape[1], bos_id)
    tok = embed(lay.ids)
    inputs = torch.cat([tok[:, : lay.n_bos], e.to(tok.dtype), tok[:, lay.n_bos :]], dim=1)
    logits = decoder(inputs_embeds=inputs, attention_mask=lay.attention_mask).logits
    scored = lay.labels != IGNORE_INDEX
    logprob = torch.stack([torch.log_softmax(row[m].float(), -1).gather(-1, lab[m, None]).sum()
                           for row, lab, m in zip(logits, lay.labels, scored)])
    return ((logits.argmax(-1) == lay.labels) & scored).sum(1), scored.sum(1), logprob


@torch.no_grad()
def regenerate(decoder, e: torch.Tensor, bos_id: int | None, eos_id: int, pad_id: int,
               max_new_tokens: int) -> torch.Tensor:
    """Greedy token ids [S, <= max_new_tokens] from [BOS] e_1..e_k alone (rows end at EOS, then pad)."""
    embed = decoder.get_input_embeddings()
    prefix = e.to(embed.weight.dtype)
    if bos_id is not None:
        prefix = torch.cat([embed(torch.full((e.shape[0], 1), bos_id, device=e.device)), prefix], dim=1)
    ones = torch.ones(prefix.shape[:2], dtype=torch.long, device=e.device)
    return decoder.generate(inputs_embeds=prefix, attention_mask=ones, max_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id)


@torch.no_grad()
def reconstruct(encoder: Encoder, decoder, texts: list[str], instruction: str | None = None,
                decoder_bos: bool = False, max_new_tokens: int = 64, batch_size: int = 8,
                shared_prefix: torch.Tensor | None = None) -> list[dict]:
    """One dict per text: ``text``, ``regenerated`` (greedy, from the compressed tokens alone),
    ``token_accuracy`` (teacher-forced argmax over the tokens the encoder read and EOS), ``tokens``,
    ``gap`` (nats: log p(text | its own e) - log p(text | the mean e of all ``texts``), the information
    gap of one text; several texts are needed for it to say anything) and ``cut`` (the text was longer
    than the encoder's ``max_text_len``: only what it read is scored, since nothing else can be in the
    compressed tokens)."""
    te, tok = encoder.text_encoder, encoder.text_encoder.tokenizer
    instruction = encoder.instruction if instruction is None else instruction
    device = next(decoder.parameters()).device
    bos = tok.bos_token_id if decoder_bos else None
    chunks = [texts[start : start + batch_size] for start in range(0, len(texts), batch_size)]
    states = []  # every text's e first: the shared e is their mean
    for chunk in chunks:
        enc = te.encode_inputs(chunk, [instruction] * len(chunk))
        mask = enc["attention_mask"].to(device)
        hidden = encoder.model(input_ids=enc["input_ids"].to(device), attention_mask=mask).last_hidden_state
        states.append(compressed_states(hidden, mask, encoder.k))
    mean = torch.cat(states).mean(0, keepdim=True)
    out = []
    for chunk, own in zip(chunks, states):
        e, shared = (with_shared_prefix(x, shared_prefix) for x in (own, mean.expand_as(own)))  # as the decoder reads
        read, cut = zip(*map(te.read_ids, chunk))
        ids, tmask = (x.to(device) for x in te.pad([r + [tok.eos_token_id] for r in read]))
        right, scored, logprob = teacher_forced(decoder, e, ids, tmask, bos)
        logprob_shared = teacher_forced(decoder, shared, ids, tmask, bos)[2]
        generated = regenerate(decoder, e, bos, tok.eos_token_id, tok.pad_token_id, max_new_tokens)
        for i, text in enumerate(chunk):
            out.append({"text": tok.decode(read[i]).strip() if cut[i] else text,
                        "regenerated": tok.decode(generated[i], skip_special_tokens=True).strip(),
                        "token_accuracy": int(right[i]) / max(int(scored[i]), 1), "tokens": int(scored[i]),
                        "gap": float(logprob[i] - logprob_shared[i]), "cut": cut[i]})
    return out


def summary(results: list[dict]) -> dict:
    """Token accuracy over all tokens, the share of texts regenerated exactly, and the information gap
    per token and per text (what stage 1 logs as info_gap and info_gap_text, on these texts)."""
    tokens, n = sum(r["tokens"] for r in results), max(len(results), 1)
    gap = sum(r["gap"] for r in results)
    return {"texts": len(results),
            "token_accuracy": sum(r["token_accuracy"] * r["tokens"] for r in results) / max(tokens, 1),
            "exact": sum(r["regenerated"] == r["text"].strip() for r in results) / n,
            "info_gap": gap / max(tokens, 1), "info_gap_text": gap / n, "cut": sum(r["cut"] for r in results)}
