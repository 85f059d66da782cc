"""An export loads with plain ``SentenceTransformer(path)`` and embeds as ``Encoder`` does."""
import json
import os

import numpy as np
import pytest

from autoregembed.encoder import Encoder

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
    # the template is the tokenizer's: the text, the instruction, then the EMBED tokens, the text cut to budget
    ids = st.tokenizer(TEXTS[2], truncation=True)["input_ids"]
    assert ids == ours.text_encoder.encoder_ids(TEXTS[2], ours.instruction)
    assert len(ids) < len(ours.text_encoder.tokenizer(TEXTS[2], add_special_tokens=False)["input_ids"])


def test_sentence_transformers_embeddings_are_unit_and_distinct(tiny_export):
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(tiny_export, device="cpu").encode(TEXTS)
    assert np.linalg.norm(emb, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-5)
    assert np.abs(emb[0] - emb[3]).max() > 1e-4
