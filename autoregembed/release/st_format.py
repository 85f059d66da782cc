"""The sentence-transformers layout of an export: ``SentenceTransformer(folder)`` embeds as
``Encoder`` does, from sentence-transformers' own modules only (no ``trust_remote_code``).

- The tokenizer's chat template writes our template: [BOS] text "\\n" instruction "\\n"
  <EMBED0>..<EMBED{k-1}>, the instruction being a system message when there is one (a
  sentence-transformers prompt, ``encode(..., prompt=...)``, or a ``prompts`` entry by name),
  else the export's query / document instruction for ``task="query"`` / ``"document"``
  (``encode_query`` / ``encode_document``), else its instruction.  ``prompts`` holds the export's
  whole table (instructions.py), so MTEB through sentence-transformers picks what
  ``AutoRegEmbedMTEB`` picks.
- The text keeps ``max_text_len`` tokens under every instruction of the table, as ``TextEncoder``
  does: sentence-transformers truncates the rendered sequence to one length and restores the
  template's tail, so the template evens every tail out to the longest with filler tokens after
  the EMBED tokens (the encoder is causal and WordWeights gives them weight 0, so they change no
  embedding).  A prompt outside the table has no filler: past the budget its text keeps as many
  more tokens as its tail is shorter than the longest.
- The tokenizer's post-processor writes the same template with the export's instruction, for users of
  transformers alone: ``tokenizer(text)`` gives the encoder's whole input (autoregembed itself always
  tokenizes with ``add_special_tokens=False``, as the chat template does).
- Transformer -> WordWeights (1 on the pooled EMBED tokens, 0 elsewhere) -> mean Pooling -> Normalize
  is the mean of the pooled e_i (all k unless the export's ``pooled`` names some), L2-normalised:
  WordWeights zeroes every other state and supplies their count as the mean's denominator.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from ..ground.errors import InputError
from .instructions import prompts
from ..method.tokenization import TextEncoder, embed_token_names

ST = "sentence_transformers."
MODULES = [  # (folder, class) in order; "" is the export folder itself
    ("", ST + "base.modules.transformer.Transformer"),
    ("1_WordWeights", ST + "sentence_transformer.modules.word_weights.WordWeights"),
    ("2_Pooling", ST + "sentence_transformer.modules.pooling.Pooling"),
    ("3_Normalize", ST + "base.modules.normalize.Normalize"),
]
SUFFIX_TOKEN = "<autoregembed:instruction+embed>"  # names the template's suffix; never in the text


def _write_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def template_post_processor(tokenizer, k: int, instruction: str) -> dict:
    """The ``post_processor`` entry of tokenizer.json that appends our template's suffix."""
    te = TextEncoder(tokenizer, k)
    bos = tokenizer.bos_token
    suffix_ids = te.encoder_ids("", instruction)[1:]  # "\n" instruction "\n" + EMBED ids
    suffix_tokens = tokenizer.convert_ids_to_tokens(suffix_ids)
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": SUFFIX_TOKEN, "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": SUFFIX_TOKEN, "type_id": 0}}],
        "special_tokens": {
            bos: {"id": bos, "ids": [tokenizer.bos_token_id], "tokens": [bos]},
            SUFFIX_TOKEN: {"id": SUFFIX_TOKEN, "ids": suffix_ids, "tokens": suffix_tokens},
        },
    }


def chat_template(k: int, instruction: str, query_instruction: str, document_instruction: str,
                  filler: str = "", pads: dict[str, int] | None = None) -> str:
    """The Jinja template (see the module docstring); ``pads[instruction]`` filler tokens follow the
    EMBED tokens.  The instructions are JSON string literals, which Jinja reads as its own."""
    q, d, i = (json.dumps(x) for x in (query_instruction, document_instruction, instruction))
    return ("{% set ns = namespace(i=none) %}"
            "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.i = m['content'] %}{% endif %}{% endfor %}"
            "{% if ns.i is none %}{% if task is defined and task == 'query' %}{% set ns.i = " + q + " %}"
            "{% elif task is defined and task == 'document' %}{% set ns.i = " + d + " %}"
            "{% else %}{% set ns.i = " + i + " %}{% endif %}{% endif %}"
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
            "{{ '\\n' + ns.i + '\\n' }}" + "".join(embed_token_names(k))
            + "{% set pads = " + json.dumps(pads or {}) + " %}"
            "{% if ns.i in pads %}{{ " + json.dumps(filler) + " * pads[ns.i] }}{% endif %}")


def _filler_token(tokenizer) -> str:
    """A special token that follows the EMBED tokens to even tails out (module docstring)."""
    for token in (tokenizer.eos_token, tokenizer.pad_token):
        if token:
            return token
    raise InputError("the tokenizer has neither an EOS nor a pad token to even the sentence-transformers "
                     "template's tails out with")


def write_sentence_transformers(folder: str, tokenizer, meta, hidden_size: int):
    """Add the sentence-transformers files to an export ``folder`` that already holds the model,
    tokenizer.json and tokenizer_config.json (``meta``: its ``ExportMeta``)."""
    k, instruction, max_text_len = meta.num_embed_tokens, meta.instruction, meta.max_text_len
    table = prompts(meta)
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(tok_path):
        raise InputError(f"{folder}: no tokenizer.json (a fast tokenizer is needed for the "
                         f"sentence-transformers layout)")
    with open(tok_path) as f:
        tok_json = json.load(f)
    processor = template_post_processor(tokenizer, k, instruction)
    tok_json["post_processor"] = processor
    _write_json(tok_path, tok_json)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    te = TextEncoder(tokenizer, k)
    tails = {instr: len(te.encoder_ids("", instr)) for instr in [instruction, *table.values()]}  # BOS + tail
    longest = max(tails.values())
    # transformers alone (the post-processor): the text keeps max_text_len under the export's instruction
    tok_cfg["model_max_length"] = tails[instruction] + max_text_len
    tok_cfg["padding_side"] = "right"  # the EMBED tokens sit right after each row's last real token
    tok_cfg["chat_template"] = chat_template(k, instruction, table["query"], table["document"],
                                             _filler_token(tokenizer),
                                             {instr: longest - n for instr, n in tails.items() if longest > n})
    _write_json(cfg_path, tok_cfg)

    _write_json(os.path.join(folder, "modules.json"),
                [{"idx": i, "name": str(i), "path": path, "type": cls} for i, (path, cls) in enumerate(MODULES)])
    _write_json(os.path.join(folder, "sentence_bert_config.json"),
                {"transformer_task": "feature-extraction",
                 # every tail evened out to the longest: the text keeps max_text_len under any table entry
                 "max_seq_length": longest + max_text_len,
                 "modality_config": {m: {"method": "forward", "method_output_name": "last_hidden_state"}
                                     for m in ("text", "message")},  # text is rendered as a message
                 "module_output_name": "token_embeddings"})
    _write_json(os.path.join(folder, "config_sentence_transformers.json"),
                {"model_type": "SentenceTransformer", "prompts": table, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"})

    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    names = embed_token_names(k)
    weights = set(names if meta.pooled is None else [names[i - 1] for i in meta.pooled])
    ww = os.path.join(folder, MODULES[1][0])
    os.makedirs(ww, exist_ok=True)
    _write_json(os.path.join(ww, "config.json"),
                {"vocab": vocab, "word_weights": {name: 1.0 for name in weights}, "unknown_word_weight": 0.0})
    table = torch.tensor([[1.0 if t in weights else 0.0] for t in vocab])
    save_file({"emb_layer.weight": table}, os.path.join(ww, "model.safetensors"))
    pool = os.path.join(folder, MODULES[2][0])
    os.makedirs(pool, exist_ok=True)
    _write_json(os.path.join(pool, "config.json"),
                {"embedding_dimension": hidden_size, "pooling_mode": "mean", "include_prompt": True})
    os.makedirs(os.path.join(folder, MODULES[3][0]), exist_ok=True)
