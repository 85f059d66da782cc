"""An export loads with plain ``SentenceTransformer(path)`` and embeds as ``Encoder`` does."""
import json
import os

import numpy as np
import pytest

from autoregembed.release.encoder import Encoder

TEXTS = ["a man is playing a guitar .", "x",
         " ".join(["the cat sat on the mat and then it went to sleep ."] * 12),  # past max_text_len: truncated
         "two dogs run through a field of tall grass ."]


def test_sentence_transformers_loads_the_export_and_matches_encoder(tiny_export):
    from sentence_transformers import SentenceTransformer

    modules = json.load(open(os.path.join(tiny_export, "modules.json")))
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)  # no trust_remote_code
    st = SentenceTransformer(tiny_export, device="cpu")
    ours = Encoder.from_pretrained(tiny_export, device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, batch_size=3), ours.encode(TEXTS), atol=1e-5)
    # transformers alone: the tokenizer writes the text, the instruction, the EMBED tokens, the text cut to budget
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_export)(TEXTS[2], truncation=True)["input_ids"]
    assert ids == ours.text_encoder.encoder_ids(TEXTS[2], ours.instruction)
    assert len(ids) < len(ours.text_encoder.tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"])


def test_an_exports_pooling_travels_to_sentence_transformers(tiny_export, pooled_export):
    """An export that pools e_1..e_4 (eval.pooling) embeds so through Encoder and sentence-transformers,
    and not as the same model pooling all five; Encoder's pooling= reads it either way."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer

    pooled = Encoder.from_pretrained(pooled_export, device="cpu")
    np.testing.assert_allclose(SentenceTransformer(pooled_export, device="cpu").encode(TEXTS, batch_size=3),
                               pooled.encode(TEXTS), atol=1e-5)
    every = Encoder.from_pretrained(tiny_export, device="cpu")
    assert np.abs(pooled.encode(TEXTS) - every.encode(TEXTS)).max() > 1e-3
    np.testing.assert_allclose(Encoder.from_pretrained(tiny_export, device="cpu", pooling="all_but_last").encode(TEXTS),
                               pooled.encode(TEXTS), atol=1e-6)
    np.testing.assert_allclose(Encoder.from_pretrained(pooled_export, device="cpu", pooling="all").encode(TEXTS),
                               every.encode(TEXTS), atol=1e-6)
    # by hand: the normalised mean of the first four EMBED states
    enc = pooled.text_encoder.encode_inputs(TEXTS[:2], [pooled.instruction] * 2)
    with torch.no_grad():
        hidden = pooled.model(**enc).last_hidden_state
    ends = enc["attention_mask"].sum(1)
    want = torch.stack([F.normalize(hidden[i, end - 5 : end - 1].mean(0), dim=0) for i, end in enumerate(ends)])
    np.testing.assert_allclose(pooled.encode(TEXTS[:2]), want.numpy(), atol=1e-5)


def test_sentence_transformers_embeddings_are_unit_and_distinct(tiny_export):
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(tiny_export, device="cpu").encode(TEXTS)
    assert np.linalg.norm(emb, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-5)
    assert np.abs(emb[0] - emb[3]).max() > 1e-4


@pytest.fixture(scope="module")
def qd_export(tiny_base, tmp_path_factory):
    """An export with its own query and document instructions."""
    import torch

    from autoregembed.release.export import export_encoder

    from autoregembed.release.meta import ExportMeta
    from autoregembed.run.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model(tiny_base, tiny_base, 5, torch.float32, "sdpa")
    out = str(tmp_path_factory.mktemp("qd") / "model")
    export_encoder(model.encoder, tok, out, ExportMeta(
        num_embed_tokens=5, max_text_len=64, instruction="Retrieve semantically similar text.",
        query_instruction='Given a "question", find its answer.', document_instruction="Represent the passage."))
    return out


def test_encode_query_and_encode_document_use_the_exports_instructions(qd_export):
    """sentence-transformers' own query/document/prompt mechanisms put the instruction in our
    template's slot: each equals Encoder with that instruction, and query != document."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(qd_export, device="cpu")
    ours = Encoder.from_pretrained(qd_export, device="cpu")
    q, d = st.encode_query(TEXTS), st.encode_document(TEXTS)
    np.testing.assert_allclose(q, ours.encode(TEXTS, instruction='Given a "question", find its answer.'), atol=1e-5)
    np.testing.assert_allclose(q, ours.encode_query(TEXTS), atol=1e-5)
    np.testing.assert_allclose(d, ours.encode_document(TEXTS), atol=1e-5)
    assert np.abs(q - d).max() > 1e-3
    np.testing.assert_allclose(st.encode(TEXTS), ours.encode(TEXTS), atol=1e-5)  # no task: the instruction
    # every prompt of the table keeps the text budget, long texts included, through a prompt name or its text
    for name in ("Clustering", "Retrieval-query", "STS", "query"):
        want = ours.encode(TEXTS, instruction=st.prompts[name])
        np.testing.assert_allclose(st.encode(TEXTS, prompt_name=name), want, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(st.encode(TEXTS, prompt=st.prompts[name]), want, atol=1e-5, err_msg=name)
    short = TEXTS[:2] + TEXTS[3:]  # a prompt outside the table: equal within the text budget
    np.testing.assert_allclose(st.encode(short, prompt="Find it."), ours.encode(short, instruction="Find it."),
                               atol=1e-5)


def test_mteb_through_sentence_transformers_picks_our_instructions(qd_export):
    """MTEB's sentence-transformers wrapper and AutoRegEmbedMTEB resolve the same table the same way."""
    import types

    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType
    from sentence_transformers import SentenceTransformer

    from autoregembed.release.mteb_model import AutoRegEmbedMTEB

    st, ours = SentenceTransformer(qd_export, device="cpu"), AutoRegEmbedMTEB(qd_export)
    for name, type_, side in [("STS12", "STS", None), ("NFCorpus", "Retrieval", PromptType.query),
                              ("NFCorpus", "Retrieval", PromptType.document), ("X", "Classification", None),
                              ("Y", "Unknown", PromptType.query), ("Z", "Unknown", None)]:
        meta = types.SimpleNamespace(name=name, type=type_)
        key = get_prompt_name(st.prompts, meta, side)
        via_st = st.prompts[key] if key else ours.export_meta.instruction
        assert ours.instruction_for(meta, side) == via_st, (name, side)


def test_an_adapter_export_embeds_as_the_merged_export_of_the_same_encoder(tiny_export, tmp_path):
    """export_adapter and export_encoder of one LoRA encoder: Encoder and sentence-transformers read the
    adapters over their base as the merged weights (1e-5), and not as the base alone."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from autoregembed.ground.lora import add_lora
    from autoregembed.release.encoder import _load
    from autoregembed.release.export import export_adapter, export_encoder
    from autoregembed.release.meta import ExportMeta

    torch.manual_seed(0)
    encoder = add_lora(_load(tiny_export, "cpu", torch.float32), 4, 0.0, 0.0, "all-linear")
    for name, p in encoder.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    tok, meta = AutoTokenizer.from_pretrained(tiny_export), ExportMeta.read(tiny_export)
    merged = export_encoder(encoder, tok, str(tmp_path / "model"), meta)
    adapter = export_adapter(encoder, tok, str(tmp_path / "adapter"), meta, tiny_export)
    want = Encoder.from_pretrained(merged, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(Encoder.from_pretrained(adapter, device="cpu").encode(TEXTS), want, atol=1e-5)
    np.testing.assert_allclose(SentenceTransformer(adapter, device="cpu").encode(TEXTS, batch_size=3), want, atol=1e-5)
    assert np.abs(Encoder.from_pretrained(tiny_export, device="cpu").encode(TEXTS) - want).max() > 1e-3
