"""The tokenisation contract of DEVELOPERS.md, checked id by id."""
import pytest
from transformers import AutoTokenizer

from autoregembed.method.logprobs import IGNORE_INDEX
from autoregembed.method.tokenization import TextEncoder, decoder_labels, embed_token_names, prepare_tokenizer
from autoregembed.ground.errors import InputError

K = 5


@pytest.fixture(scope="module")
def te(tiny_base):
    return TextEncoder(prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_base), K), K,
                       max_text_len=8, max_target_len=6)


def test_embed_tokens_are_single_new_special_tokens(te):
    tok = te.tokenizer
    ids = te.embed_ids
    assert len(set(ids)) == K
    assert all(i >= tok.vocab_size for i in ids)  # added after the base vocabulary
    for name, i in zip(embed_token_names(K), ids):
        assert tok(name, add_special_tokens=False)["input_ids"] == [i]
    n = len(tok)
    prepare_tokenizer(tok, K)  # idempotent
    assert len(tok) == n


def test_encoder_input_layout(te):
    tok = te.tokenizer
    ids = te.encoder_ids("a man is dancing", "Retrieve similar text.")
    text = tok("a man is dancing", add_special_tokens=False)["input_ids"]
    tail = tok("\nRetrieve similar text.\n", add_special_tokens=False)["input_ids"]
    assert ids == [tok.bos_token_id] + text + tail + te.embed_ids


def test_text_is_truncated_not_the_instruction(te):
    long = " ".join(["word"] * 50)
    ids = te.encoder_ids(long, "Keep me.")
    tail = te.tokenizer("\nKeep me.\n", add_special_tokens=False)["input_ids"]
    assert ids[1 : 1 + 8] == te.tokenizer(long, add_special_tokens=False)["input_ids"][:8]
    assert ids[9:] == tail + te.embed_ids


def test_right_padding_puts_embed_tokens_after_last_real_token(te):
    batch = te.encode_inputs(["short", "a much longer sentence here"], ["Q.", "Q."])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # right padding
        assert row[n - K : n].tolist() == te.embed_ids
        assert (row[n:] == te.tokenizer.pad_token_id).all()


def test_targets_end_with_eos_and_labels_skip_compressed_positions(te):
    t = te.encode_targets(["hello world", "a b c d e f g h i"])
    ids, mask = t["target_ids"], t["target_mask"]
    row0 = te.tokenizer("hello world", add_special_tokens=False)["input_ids"] + [te.tokenizer.eos_token_id]
    assert ids[0, : len(row0)].tolist() == row0
    assert int(mask[1].sum()) == 6 + 1  # truncated to max_target_len, then EOS
    labels = decoder_labels(ids, mask, K)
    assert labels.shape == (2, K + ids.shape[1])
    assert (labels[:, : K - 1] == IGNORE_INDEX).all()  # e_1..e_{k-1} predict nothing
    assert labels[0, K - 1 : K - 1 + len(row0)].tolist() == row0  # e_k predicts the first target token
    assert (labels[0, K - 1 + len(row0) :] == IGNORE_INDEX).all()
    assert (labels[:, -1] == IGNORE_INDEX).all()  # the EOS input position predicts nothing


def test_missing_embed_tokens_is_an_error(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    with pytest.raises(ValueError, match="EMBED"):
        TextEncoder(tok, K)


def test_instructions_with_special_tokens_or_without_room_for_a_text_are_refused(te):
    """A literal <EMBED0> in an instruction is read as the token itself (sentence-transformers' pooling then
    reads other states than the encoder); an instruction that leaves no room for a whole text in the model's
    positions collapses every embedding. Both are refused naming the key, the second with its budget."""
    for bad in ("Find <EMBED0> similar text.", f"Find {te.tokenizer.eos_token} text."):
        with pytest.raises(InputError, match=r"^key 'eval.instruction': holds the special token"):
            te.instruction_ids(bad, "key 'eval.instruction'")
    with pytest.raises(InputError, match=r"^instruction: holds the special token\(s\) <EMBED0>"):
        te.encoder_ids("a text", "see <EMBED0>")  # rows' own instructions too
    bounded = TextEncoder(te.tokenizer, K, max_text_len=8, max_positions=40)
    fits = "Retrieve semantically similar text."
    assert bounded.instruction_ids(fits) == te.instruction_ids(fits)
    long = "Retrieve semantically similar text. " * 10
    n = len(te.instruction_ids(long))
    with pytest.raises(InputError, match=rf"^key 'eval.instruction': {n} tokens \(with its two newlines\), but the "
                                         rf"model's 40 positions leave 26 beside BOS, a text of up to "
                                         rf"data.max_text_len=8 tokens and 5 EMBED tokens; shorten it \(or lower data.max_text_len\)$"):
        bounded.instruction_ids(long, "key 'eval.instruction'")


def test_the_config_refuses_embed_tokens_in_instructions_before_any_tokenizer_loads(tmp_path):
    from autoregembed.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"key 'eval.query_instruction': holds '<EMBED'"):
        load_config(None, ["eval.query_instruction=find <EMBED1>"])
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  stage2:\n    - {path: x.jsonl, instruction: 'a <EMBED0>'}\n")
    with pytest.raises(ConfigError, match=r"key 'data.stage2\[0\].instruction': holds '<EMBED'"):
        load_config(str(y))


def test_an_export_reads_no_instruction_it_cannot_fit(tiny_export):
    from autoregembed.release.encoder import Encoder

    enc = Encoder.from_pretrained(tiny_export)
    with pytest.raises(InputError, match=r"^instruction: holds the special token"):
        enc.encode(["a text"], instruction="<EMBED2>")
    with pytest.raises(InputError, match=r"^instruction: \d+ tokens .* the model's \d+ positions leave"):
        enc.encode(["a text"], instruction="word " * 5000)
