"""Stage-1 initialisation that matches the compressed tokens to the decoder's word-embedding scale."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from autoregembed.method.batches import compression_batch
from autoregembed.run.config import Config
from autoregembed.ground.data import load_rows
from autoregembed.run.decoder_scale import calibration_indices, final_norm, rescale_final_norm, scale_factors
from autoregembed.method.model import AutoRegEmbedModel
from autoregembed.method.tokenization import TextEncoder, prepare_tokenizer
from helpers import ROOT, run_child

K = 5  # the trainer default, so the trainer's export reads the same way


def _model(path, decoder_path=None):
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(path), K)
    encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
    encoder.resize_token_embeddings(len(tok))
    decoder = AutoModelForCausalLM.from_pretrained(decoder_path or path, dtype=torch.float32)
    return AutoRegEmbedModel(encoder, decoder, K).eval(), TextEncoder(tok, K, 64, 64)


def _batches(te, n_rows=128, bs=8):  # what the trainer measures on (micro batch 8)
    rows = load_rows(Config().data.stage1, stage=1)
    rows = [rows[i] for i in calibration_indices(len(rows), n_rows, Config().seed)]
    return [compression_batch(rows[i : i + bs], te) for i in range(0, len(rows), bs)]


@torch.no_grad()
def test_factors_are_the_rms_ratio_and_rescaling_makes_the_states_match(tiny_base):
    model, te = _model(tiny_base)
    batches = _batches(te)
    # by hand: every EMBED state; the decoder's whole word-embedding matrix
    states = []
    for b in batches:
        hidden = model.encoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
        for row, n in enumerate(b.attention_mask.sum(1).tolist()):
            states.append(hidden[row, n - K : n])
    states, words = torch.cat(states), model.decoder.get_input_embeddings().weight
    expected = words.pow(2).mean(0).sqrt() / states.pow(2).mean(0).sqrt()

    factors = scale_factors(model, batches)
    assert torch.allclose(factors, expected, rtol=1e-5)
    assert not torch.allclose(factors, torch.ones_like(factors), rtol=0.1)  # the tiny base is mismatched too

    before = model.embed(**te.encode_inputs(["a man plays a guitar ."], ["Find it."]))
    rescale_final_norm(model.encoder, factors)
    assert torch.allclose(scale_factors(model, batches), torch.ones_like(factors), rtol=1e-4)
    # the embedding only changes by the same diagonal rescale of mean(e)
    after = model.embed(**te.encode_inputs(["a man plays a guitar ."], ["Find it."]))
    assert torch.allclose(after, nn.functional.normalize(before * factors, dim=-1), atol=1e-5)


def test_final_norm_is_found_through_peft_and_missing_norms_are_refused(tiny_base):
    from autoregembed.ground.lora import add_lora

    encoder = AutoModel.from_pretrained(tiny_base, dtype=torch.float32)
    norm = encoder.norm
    assert final_norm(add_lora(encoder, rank=2, alpha=4, dropout=0.0, targets="all-linear")) is norm
    with pytest.raises(ValueError, match="model.match_decoder_scale=false"):
        final_norm(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="shape"):
        rescale_final_norm(encoder, torch.ones(7))


SCRIPT = """
import sys, warnings
warnings.filterwarnings("ignore")
from autoregembed.ground import distributed as D
from autoregembed.run.config import load_config
from autoregembed.run.stages import stages_for
from autoregembed.run.session import RunContext
from autoregembed.run.trainer import train_stage
cfg = load_config(None, ["output_dir=" + sys.argv[1], "model.base=" + sys.argv[2], "stage1.max_steps=1",
                         "stage1.micro_batch_size=8", "stage1.learning_rate=1e-30", "stage1.warmup_steps=0"])
D.init_distributed()
train_stage(RunContext.of(cfg, {root!r} + "/ds_configs/zero3.json"), stages_for(cfg)["stage1"])
D.shutdown()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("ranks", [1, 2])
def test_trainer_rescales_once_before_stage1_under_zero3(tmp_path, ranks, default_tiny_base):
    """With a learning rate of 1e-30 (no visible update) the exported stage-1 norm is the base norm times the factors
    measured (outside DeepSpeed) on the trainer's 128 calibration rows, on one rank and on two."""
    out = str(tmp_path / "run")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=ROOT))
    proc = run_child([script, out, default_tiny_base], ranks=ranks)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]

    base, export = default_tiny_base, os.path.join(out, "stage1", "model")
    index = json.load(open(os.path.join(export, "model.safetensors.index.json")))["weight_map"]
    with safe_open(os.path.join(export, index["norm.weight"]), "pt") as f:
        exported = f.get_tensor("norm.weight")
    # the export with the base's norm is the encoder stage 1 started from (the EMBED rows are
    # initialised at random, so they are taken from the export rather than drawn again)
    model, te = _model(export, decoder_path=base)
    assert torch.allclose(scale_factors(model, _batches(te)), torch.ones(32), rtol=1e-3)  # matched
    base_norm = AutoModel.from_pretrained(base, dtype=torch.float32).norm.weight.detach()
    model.encoder.norm.weight.data.copy_(base_norm)
    expected = base_norm * scale_factors(model, _batches(te))
    assert torch.allclose(exported, expected, rtol=1e-5, atol=1e-7)
