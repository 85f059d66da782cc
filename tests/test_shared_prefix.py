"""model.shared_prefix: the learned prefix the frozen decoder reads between e and the target."""
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from autoregembed.method.batches import compression_batch
from autoregembed.run.config import ConfigError, load_config
from autoregembed.ground.errors import InputError
from autoregembed.release.export import export_encoder
from autoregembed.release.meta import ExportMeta
from autoregembed.method.model import AutoRegEmbedModel
from autoregembed.method.shared_prefix import (PREFIX_FILE, fit_shared_prefix, initial_prefix, read_prefix,
                                        with_shared_prefix)
from autoregembed.method.tokenization import TextEncoder, prepare_tokenizer
from helpers import ROOT, run_child

K = 5
TEXTS = ["a man plays a guitar .", "two dogs run on the grass .", "the cat sleeps .", "a woman reads a book ."]


def _model(path, decoder_path=None):
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(path), K)
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
    encoder.resize_token_embeddings(len(tok))
    decoder = AutoModelForCausalLM.from_pretrained(decoder_path or path, dtype=torch.float32)
    return AutoRegEmbedModel(encoder, decoder, K, decoder_bos_id=tok.bos_token_id).eval(), TextEncoder(tok, K, 64, 64)


def _batches(te, bs=2):
    rows = [{"context": t, "instruction": "Reconstruct the original text.", "output": t} for t in TEXTS]
    return [compression_batch(rows[i : i + bs], te) for i in range(0, len(rows), bs)]


@torch.no_grad()
def test_the_decoder_reads_the_prefix_between_e_and_the_target(tiny_base):
    """score() with a prefix equals full-vocabulary log-softmax over [BOS ; e ; P ; target] by hand."""
    model, te = _model(tiny_base)
    b = _batches(te, bs=4)[0]
    e = model.compress(b.input_ids, b.attention_mask)
    prefix = torch.randn(3, e.shape[-1], generator=torch.Generator().manual_seed(0))
    model.shared_prefix = prefix
    got = model.score(e, b.target_ids, b.target_mask)

    emb = model.decoder.get_input_embeddings()
    bos = emb(torch.full((len(TEXTS), 1), te.tokenizer.bos_token_id))
    inputs = torch.cat([bos, e, prefix.expand(len(TEXTS), -1, -1), emb(b.target_ids)], dim=1)
    mask = torch.cat([torch.ones(len(TEXTS), 1 + K + 3, dtype=torch.long), b.target_mask], dim=1)
    logp = model.decoder(inputs_embeds=inputs, attention_mask=mask).logits.log_softmax(-1)
    start = 1 + K + 3 - 1  # the last prefix position predicts the first target token
    want = torch.stack([
        sum(logp[i, start + t, b.target_ids[i, t]] for t in range(int(b.target_mask[i].sum())))
        for i in range(len(TEXTS))])
    assert torch.allclose(got, want, atol=1e-4)
    model.shared_prefix = None
    assert not torch.allclose(model.score(e, b.target_ids, b.target_mask), want, atol=1e-2)  # it matters


def test_with_shared_prefix_appends_the_same_vectors_to_every_row():
    e = torch.randn(3, K, 8)
    assert with_shared_prefix(e, None) is e
    out = with_shared_prefix(e, torch.ones(2, 8, dtype=torch.float64))
    assert out.shape == (3, K + 2, 8) and out.dtype == e.dtype
    assert torch.equal(out[:, :K], e) and torch.equal(out[:, K:], torch.ones(3, 2, 8))
    mean_e = torch.arange(K * 2.0).view(K, 2)
    assert torch.equal(initial_prefix(mean_e, 7), mean_e[[0, 1, 2, 3, 4, 0, 1]])


def test_the_fit_starts_at_the_batch_mean_of_e_lowers_the_loss_and_repeats_exactly(tiny_base):
    model, te = _model(tiny_base)
    batches = _batches(te)
    with torch.no_grad():
        mean_e = torch.cat([model.compress(b.input_ids, b.attention_mask) for b in batches]).mean(0)
    start, before, same = fit_shared_prefix(model, batches, K, steps=0, lr=1e-2)
    assert torch.allclose(start, mean_e, atol=1e-6) and before == same
    fitted, before2, after = fit_shared_prefix(model, batches, 2, steps=30, lr=0.1)
    assert fitted.shape == (2, mean_e.shape[-1])
    assert after < before2 - 0.02, (before2, after)  # the tiny decoder has little to learn: 7.14 -> 7.10
    again, _, after_again = fit_shared_prefix(model, batches, 2, steps=30, lr=0.1)
    assert torch.equal(fitted, again) and after == after_again
    model.shared_prefix = fitted
    with pytest.raises(ValueError, match="already"):
        fit_shared_prefix(model, batches, 2, steps=1, lr=1e-2)
    model.shared_prefix = None
    with pytest.raises(InputError, match="model.shared_prefix"):
        fit_shared_prefix(model, batches, 0, steps=1, lr=1e-2)


def test_an_export_carries_the_prefix_and_a_bad_file_is_named(tiny_base, tmp_path):
    model, te = _model(tiny_base)
    prefix = torch.randn(2, model.encoder.config.hidden_size)
    out = str(tmp_path / "model")
    export_encoder(model.encoder, te.tokenizer, out, ExportMeta(num_embed_tokens=K, instruction="x", shared_prefix=2),
                   shared_prefix=prefix)
    assert torch.equal(read_prefix(out), prefix) and ExportMeta.read(out).shared_prefix == 2
    plain = str(tmp_path / "plain")
    export_encoder(model.encoder, te.tokenizer, plain, ExportMeta(num_embed_tokens=K, instruction="x"))
    assert read_prefix(plain) is None and ExportMeta.read(plain).shared_prefix == 0
    with open(os.path.join(out, PREFIX_FILE), "wb") as f:
        f.write(b"not safetensors")
    with pytest.raises(InputError, match=PREFIX_FILE):
        read_prefix(out)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="model.shared_prefix"):
        load_config(None, ["model.shared_prefix=-1"])
    with pytest.raises(ConfigError, match="model.shared_prefix"):
        load_config(None, ["model.shared_prefix=2", "model.shared_prefix_lr=0"])
    with pytest.raises(ConfigError, match="shard_decoder"):
        load_config(None, ["model.shared_prefix=2", "model.shard_decoder=true"])


SCRIPT = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from autoregembed.ground import distributed as D
from autoregembed.run.config import load_config
from autoregembed.run.stages import stages_for
from autoregembed.run.session import RunContext, Session
from autoregembed.run.trainer import open_trained, train_stage
cfg = load_config(None, ["output_dir=" + sys.argv[1], "model.base=" + sys.argv[2], "stage1.max_steps=2",
                         "stage1.micro_batch_size=8", "model.shared_prefix=2", "model.shared_prefix_steps=3",
                         "stage1.stop_after=" + sys.argv[3]])
D.init_distributed()
ctx, stages = RunContext.of(cfg, {root!r} + "/ds_configs/zero3.json"), stages_for(cfg)
train_stage(ctx, stages["stage1"], resume=sys.argv[3] == "2")
if sys.argv[3] == "2":  # the stage-2 side reads the export's prefix; a re-export keeps it
    s = Session(ctx, stages["stage2"], cfg.layout.stage1_model, train=False)
    if D.rank() == 0:
        torch.save(s.model.shared_prefix, sys.argv[1] + "/stage2_prefix.pt")
    s.close()
    s = open_trained(ctx, stages["stage1"])
    if D.rank() == 0:
        torch.save(s.model.shared_prefix, sys.argv[1] + "/reopened_prefix.pt")
    s.close()
D.shutdown()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2])
def test_stage1_fits_once_resumes_with_it_and_hands_it_on(tmp_path, ranks, default_tiny_base):
    """Stage 1 under ZeRO-3 fits the prefix before its first step and keeps it in the stage folder;
    the resumed run reads that file instead of fitting again (a refit after training would start
    from trained compressed tokens); the export, the stage-2 side and a re-opened checkpoint hold
    the same vectors, on one rank and on two."""
    out = str(tmp_path / "run")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=ROOT))
    first = run_child([script, out, default_tiny_base, "1"], ranks=ranks)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-4000:]
    assert "shared prefix of 2 vectors fitted in 3 steps" in first.stdout + first.stderr
    kept = read_prefix(os.path.join(out, "stage1"))
    assert kept.shape == (2, 32) and torch.isfinite(kept).all()
    second = run_child([script, out, default_tiny_base, "2"], ranks=ranks)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-4000:]
    assert "fitted" not in second.stdout + second.stderr
    export = os.path.join(out, "stage1", "model")
    assert torch.equal(read_prefix(export), kept) and ExportMeta.read(export).shared_prefix == 2
    for name in ("stage2_prefix.pt", "reopened_prefix.pt"):
        assert torch.equal(torch.load(os.path.join(out, name)).cpu(), kept), name
