"""What a run says about itself beyond the loss: stage 1's information gap, the health warnings, and
``autoregembed reconstruct``."""
import json

import pytest
import torch

from autoregembed.method.batches import compression_batch
from autoregembed.tools.cli import main
from autoregembed.run.diagnostics import GAP_FLOOR, HealthWatch, information_gap
from autoregembed.run.loading import load_model
from autoregembed.method.tokenization import TextEncoder

K = 5
TEXTS = ["a man is playing the guitar .", "two dogs run in a field", "the stock market fell today ."]


@pytest.fixture(scope="module")
def model_and_te(tiny_base):
    torch.manual_seed(0)
    model, tok = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa")
    return model.eval(), TextEncoder(tok, K, 64, 64)


def _batch(te, texts):
    return compression_batch([{"context": t, "instruction": "Reconstruct the original text.", "output": t}
                              for t in texts], te)


def test_information_gap_against_scoring_each_text_with_its_own_and_with_the_mean_tokens(model_and_te, monkeypatch):
    model, te = model_and_te
    batch = _batch(te, TEXTS)
    scale = model.decoder.get_input_embeddings().weight.std()
    e = torch.randn(len(TEXTS), K, model.decoder.config.hidden_size, generator=torch.Generator().manual_seed(0)) * scale * 3
    monkeypatch.setattr(model, "compress", lambda ids, mask, n_tokens=None: e)  # compressed tokens far apart: a gap far above rounding
    got = information_gap(model, [batch])  # the module stands in for the engine: same forward
    with torch.no_grad():
        own = model.score(e, batch.target_ids, batch.target_mask)
        mean = (e[0] + e[1] + e[2]) / 3
        shared = model.score(mean.expand(len(TEXTS), -1, -1), batch.target_ids, batch.target_mask)
    n = batch.target_mask.sum().item()
    assert abs(got["info_gap"]) > 0.01
    assert got["loss_shared"] == pytest.approx(-shared.sum().item() / n, rel=1e-5)
    assert got["info_gap"] == pytest.approx((own - shared).sum().item() / n, rel=1e-3)
    assert got["info_gap_text"] == pytest.approx((own - shared).sum().item() / len(TEXTS), rel=1e-3)


def test_the_gap_is_zero_when_every_text_gets_the_same_compressed_tokens(model_and_te):
    model, te = model_and_te
    got = information_gap(model, [_batch(te, [TEXTS[0]] * 3), _batch(te, [TEXTS[1]] * 2)])
    assert got["info_gap"] == pytest.approx(0, abs=1e-5) and got["info_gap_text"] == pytest.approx(0, abs=1e-4)


def test_sts_during_training_equals_the_encoder_of_the_same_weights(model_and_te):
    """eval.every reads the model in training the way an export is read: same embeddings, same score;
    the engine is left in training mode."""
    import os
    from types import SimpleNamespace

    from autoregembed.run.diagnostics import sts_during_training
    from autoregembed.release.encoder import Encoder
    from autoregembed.release.evaluate import sts_eval

    model, te = model_and_te
    sts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "autoregembed", "resources",
                       "sts_dev_sample.csv")
    engine = SimpleNamespace(module=model, eval=model.eval, train=model.train)
    model.train()
    got = sts_during_training(engine, te, "Retrieve semantically similar text.", sts, 16)
    assert model.training
    model.eval()
    want = sts_eval(Encoder(model.encoder, te.tokenizer, K, "Retrieve semantically similar text.", 64), sts, 16,
                    show_progress_bar=False)
    # the Encoder batches by length, so padding differs: float noise that can swap near-tied ranks
    assert got["sts_spearman"] == pytest.approx(want["spearman"], abs=0.05)
    assert got["sts_mean_cosine"] == pytest.approx(want["mean_cosine"], abs=1e-5)


def test_health_watch_warns_once_about_dead_gradients_and_a_gap_that_stays_near_zero():
    said = []
    watch = HealthWatch("stage1", warmup_steps=5, total_steps=16, log=said.append)
    watch.update({"step": 8, "grad_norm": 1.0, "info_gap": 0.0, "info_gap_text": 0.0})  # first half: no word yet
    assert not said
    for step in range(4, 8):
        watch.update({"step": step, "grad_norm": 0.0})
    assert len(said) == 1 and "training has died" in said[0] and "up to step 6" in said[0]
    watch.update({"step": 10, "grad_norm": 2.0, "info_gap": GAP_FLOOR / 2, "info_gap_text": 0.4})
    watch.update({"step": 20, "grad_norm": 2.0, "info_gap": GAP_FLOOR / 3, "info_gap_text": 0.3})
    assert len(said) == 2 and "information gap 0.025 nats/token at step 10" in said[1]
    assert watch.summary() == ("WARNING: information gap 0.017 nats/token, 0.30 nats/text at step 20, below 0.05: "
                               "not compressing")
    watch.update({"step": 30, "grad_norm": 2.0, "info_gap": 1.2, "info_gap_text": 9.6})
    assert watch.summary() == "information gap 1.200 nats/token, 9.60 nats/text at step 30" and len(said) == 2


def test_greedy_regeneration_is_the_path_teacher_forcing_scores_as_all_right(model_and_te):
    """The two halves of reconstruct read the decoder alike: the greedy tokens, scored as targets
    given the same compressed tokens, are each the argmax (accuracy 1), with and without the BOS."""
    from autoregembed.release.reconstruct import regenerate, teacher_forced

    model, te = model_and_te
    tok = te.tokenizer
    batch = _batch(te, TEXTS)
    with torch.no_grad():
        e = model.compress(batch.input_ids, batch.attention_mask)
    for bos in (None, tok.bos_token_id):
        gen = regenerate(model.decoder, e, bos, tok.eos_token_id, tok.pad_token_id, max_new_tokens=12)
        rows = []
        for g in gen.tolist():
            row = g[: g.index(tok.eos_token_id) + 1] if tok.eos_token_id in g else g
            rows.append(row)
        ids, mask = te.pad(rows)
        right, scored, _ = teacher_forced(model.decoder, e, ids, mask, bos)
        assert scored.tolist() == [len(r) for r in rows]
        assert right.tolist() == scored.tolist()


def test_reconstructions_gap_is_the_training_probes_own_minus_shared_score_with_the_mean_over_all_texts(model_and_te):
    """reconstruct's gap per text is log p(text | own e) - log p(text | the mean e of every text asked),
    the model's own scorer as reference, with chunks smaller than the texts (the mean is not a chunk's);
    its summary is the gap per token and per text as stage 1 logs them."""
    from autoregembed.release.encoder import Encoder
    from autoregembed.release.reconstruct import reconstruct, summary

    model, te = model_and_te
    instruction = "Reconstruct the original text."
    got = reconstruct(Encoder(model.encoder, te.tokenizer, K, instruction, 64), model.decoder, TEXTS, batch_size=2,
                      max_new_tokens=2)
    batch = _batch(te, TEXTS)
    with torch.no_grad():
        e = model.compress(batch.input_ids, batch.attention_mask)
        own = model.score(e, batch.target_ids, batch.target_mask)
        shared = model.score(e.mean(0, keepdim=True).expand_as(e), batch.target_ids, batch.target_mask)
    want = (own - shared).tolist()
    assert [r["gap"] for r in got] == pytest.approx(want, rel=1e-3, abs=1e-4) and max(map(abs, want)) > 1e-3
    s = summary(got)
    assert s["info_gap"] == pytest.approx(sum(want) / batch.target_mask.sum().item(), rel=1e-3, abs=1e-5)
    assert s["info_gap_text"] == pytest.approx(sum(want) / 3, rel=1e-3, abs=1e-4) and s["cut"] == 0


def test_reconstruct_command_prints_each_text_and_a_summary(tiny_export, tiny_base, tmp_path, capsys):
    out = tmp_path / "rec.jsonl"
    assert main(["reconstruct", "--model", tiny_export, "--decoder", tiny_base, "--text", TEXTS[0], "--text", TEXTS[1],
                 "--max-new-tokens", "8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"original:    {TEXTS[0]}" in printed and printed.count("regenerated: ") == 2
    summary = json.loads(printed.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["texts"] == 2 and [r["text"] for r in rows] == TEXTS[:2]
    weighted = sum(r["token_accuracy"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)
    assert summary["token_accuracy"] == pytest.approx(weighted) and 0 <= weighted <= 1


def test_reconstruct_scores_only_the_tokens_the_encoder_read(tiny_export, tiny_base):
    """A text longer than the encoder's max_text_len is scored on the part it read (the rest cannot be in
    its compressed tokens) and says it was cut; the accuracy is that of the cut text given alone."""
    from autoregembed.release.encoder import Encoder
    from autoregembed.release.reconstruct import load_decoder, reconstruct

    encoder = Encoder.from_pretrained(tiny_export)
    decoder = load_decoder(tiny_base, "cpu")
    tok = encoder.text_encoder.tokenizer
    long_text = " ".join(TEXTS)
    ids = tok(long_text, add_special_tokens=False)["input_ids"]
    encoder.text_encoder.max_text_len = 6
    (cut,) = reconstruct(encoder, decoder, [long_text], max_new_tokens=4)
    assert cut["cut"] and cut["tokens"] == 6 + 1  # what it read and EOS
    assert cut["text"] == tok.decode(ids[:6]).strip()
    (alone,) = reconstruct(encoder, decoder, [cut["text"]], max_new_tokens=4)
    assert not alone["cut"] and alone["tokens"] == 7 and alone["token_accuracy"] == cut["token_accuracy"]
    encoder.text_encoder.max_text_len = len(ids)
    (whole,) = reconstruct(encoder, decoder, [long_text], max_new_tokens=4)
    assert not whole["cut"] and whole["tokens"] == len(ids) + 1 and whole["text"] == long_text


def test_reconstruct_refuses_a_missing_decoder_in_one_line(tiny_export, tmp_path, capsys):
    assert main(["reconstruct", "--model", tiny_export, "--text", "x"]) == 2  # its metadata names no base model
    err = capsys.readouterr().err
    assert err.startswith("autoregembed: error: ") and "pass --decoder" in err and len(err.strip().splitlines()) == 1
