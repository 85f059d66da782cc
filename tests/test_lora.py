"""LoRA on the encoder: only adapters train, and the export is the merged plain model.

(The same path under ZeRO-3 on two ranks is covered by test_distributed.py's "lora" run.)
"""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from autoregembed.method.batches import compression_batch
from autoregembed.run.config import ConfigError, load_config
from autoregembed.release.encoder import Encoder
from autoregembed.release.export import export_encoder
from autoregembed.release.meta import ExportMeta
from autoregembed.run.loading import load_model
from autoregembed.method.losses import CompressionLoss
from autoregembed.method.tokenization import TextEncoder

K = 3
TEXTS = ["a man is playing the guitar .", "two dogs run in a field", "the stock market fell today ."]
LORA = dict(rank=4, alpha=8.0, dropout=0.0, targets="all-linear")


def _exported_names(folder):
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    return set(index["weight_map"])


def test_only_adapters_train_and_the_export_is_the_merged_plain_model(tiny_base, tmp_path):
    torch.manual_seed(0)  # same seed, same random init of the new EMBED rows in both models
    plain, tok = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa")
    torch.manual_seed(0)
    model, _ = load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", lora=LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(n.startswith("encoder.") for n in trainable)  # the decoder stays frozen

    te = TextEncoder(tok, K, 32, 32)
    rows = [{"context": t, "instruction": "Reconstruct the original text.", "output": t} for t in TEXTS]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # B starts at zero: train so that the merge has something to add
        batch = compression_batch(rows, te)
        CompressionLoss()(model(batch), batch).backward()
        opt.step()
        opt.zero_grad()
    inputs = te.encode_inputs(TEXTS, ["Retrieve semantically similar text."] * len(TEXTS))
    with torch.no_grad():
        in_memory = model.eval().embed(**inputs).numpy()
        before = plain.eval().embed(**inputs).numpy()
    assert np.abs(in_memory - before).max() > 1e-3, "training did not move the adapted encoder"

    base_dir, lora_dir = str(tmp_path / "plain"), str(tmp_path / "lora")
    meta = ExportMeta(num_embed_tokens=K, instruction="Retrieve semantically similar text.", max_text_len=32)
    export_encoder(plain.encoder, tok, base_dir, meta)
    export_encoder(model.encoder, tok, lora_dir, meta)
    assert _exported_names(lora_dir) == _exported_names(base_dir)  # no adapter or base_layer names
    reloaded = Encoder.from_pretrained(lora_dir, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(reloaded, in_memory, atol=1e-5)

    # the merge changed exactly the adapted (linear) weights
    (f_plain,), (f_lora,) = ([os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors")]
                             for d in (base_dir, lora_dir))
    with safe_open(f_plain, "pt") as a, safe_open(f_lora, "pt") as b:
        changed = {k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))}
    assert changed and all(k.endswith("proj.weight") for k in changed), changed


def test_lora_targets_that_match_nothing_are_refused(tiny_base):
    with pytest.raises(ValueError, match="lora_targets"):
        load_model(tiny_base, tiny_base, K, torch.float32, "sdpa", lora={**LORA, "targets": "no_such_proj"})


@pytest.mark.parametrize("override, key", [("model.lora_rank=-1", "model.lora_rank"),
                                           ("model.lora_dropout=1.5", "model.lora_dropout")])
def test_lora_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


LORA_STAGES_CHILD = """
import json, sys
from peft.tuners.lora import LoraLayer
from autoregembed.ground import distributed as D
from autoregembed.run.config import load_config
from autoregembed.run.stages import stages_for
from autoregembed.run.session import RunContext, Session
from autoregembed.tools.cli import DEFAULT_DS
out, base = sys.argv[1:3]
cfg = load_config(None, [f"output_dir={out}", f"model.base={base}", "model.lora_rank=4", "model.lora_stages=stage2",
                         "model.match_decoder_scale=false"])
D.init_distributed()
seen, numel = {}, lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # ZeRO-3 holds partitions
for stage in ("stage1", "stage2"):
    s = Session(RunContext.of(cfg, DEFAULT_DS), stages_for(cfg)[stage], base, train=True)
    enc = s.engine.module.encoder
    seen[stage] = {"lora": any(isinstance(m, LoraLayer) for m in enc.modules()),
                   "trainable": sum(numel(p) for p in enc.parameters() if p.requires_grad),
                   "total": sum(numel(p) for p in enc.parameters()),
                   "card": s._provenance()["parameters"]}
    s.close()
print("SEEN " + json.dumps(seen))
D.shutdown()
"""


@pytest.mark.distributed
def test_lora_trains_only_the_stages_model_lora_stages_names(tiny_base, tmp_path):
    """model.lora_stages=stage2 (the common case): stage 1 trains every weight, stage 2 only adapters;
    the card says which; reference.source=online then still has adapters to disable."""
    from helpers import run_child

    r = run_child(["-c", LORA_STAGES_CHILD, tmp_path, tiny_base])
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.split("SEEN ")[-1])
    assert seen["stage1"]["lora"] is False and seen["stage1"]["card"] == "full fine-tune"
    assert seen["stage1"]["trainable"] == seen["stage1"]["total"] > 0
    assert seen["stage2"]["lora"] is True and seen["stage2"]["card"] == "LoRA rank 4"
    assert 0 < seen["stage2"]["trainable"] < seen["stage2"]["total"] / 5
    with pytest.raises(ConfigError, match="'reference.source': 'online' needs LoRA in stage 2"):
        load_config(None, ["model.lora_rank=4", "model.lora_stages=stage1", "reference.source=online"])
    with pytest.raises(ConfigError, match="'model.lora_stages': 'stage3' is not a comma-separated list"):
        load_config(None, ["model.lora_rank=4", "model.lora_stages=stage3"])


@pytest.mark.distributed
@pytest.mark.usefixtures("default_tiny_base")
def test_a_lora_stage_hands_over_its_adapters_alone_loadable_as_the_merged_export(tmp_path):
    """Stage 2 through LoRA (model.lora_stages=stage2) writes stage2/adapter beside stage2/model: PEFT's
    layout over the stage-1 export, megabytes instead of a whole model; Encoder and sentence-transformers
    load it and embed as the merged export does (1e-5), which the stage-1 export does not; a later run
    without LoRA moves the stale adapters aside."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from autoregembed.release.encoder import Encoder
    from helpers import ROOT, TINY_BASE, run_train

    out = str(tmp_path / "run")
    sets = ["stage1.max_steps=2", "stage1.micro_batch_size=4", "stage2.max_steps=3", "stage2.micro_batch_size=4",
            "stage2.learning_rate=5e-3", "model.lora_rank=4", "model.lora_stages=stage2", "reference.source=online",
            "model.match_decoder_scale=false", "monitor.plot=false", "eval.retrieval=none",
            f"eval.sts_file={ROOT}/autoregembed/resources/sts_dev_sample.csv", f"model.base={TINY_BASE['path']}",
            f"output_dir={out}"]
    r = run_train(sets)
    assert r.returncode == 0, r.stderr[-3000:]
    merged, adapter, stage1 = (os.path.join(out, *p) for p in (("stage2", "model"), ("stage2", "adapter"),
                                                                ("stage1", "model")))
    assert not os.path.exists(os.path.join(out, "stage1", "adapter"))  # stage 1 trained every weight
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.abspath(stage1) and config["r"] == 4
    size = lambda folder: sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)  # noqa: E731
                              if f.endswith(".safetensors"))
    assert size(adapter) < size(merged) / 5
    texts = ["a man is playing a guitar .", "two dogs run through a field .", "the stock market fell ."]
    want = Encoder.from_pretrained(merged, device="cpu").encode(texts)
    np.testing.assert_allclose(Encoder.from_pretrained(adapter, device="cpu").encode(texts), want, atol=1e-5)
    np.testing.assert_allclose(SentenceTransformer(adapter, device="cpu").encode(texts), want, atol=1e-5)
    assert np.abs(Encoder.from_pretrained(stage1, device="cpu").encode(texts) - want).max() > 1e-4
    # stage 2 again, without LoRA: the merged export is replaced, the adapters that no longer fit are set aside
    again = ["stage=stage2", "model.lora_rank=0", "loss.kind=infonce", "stage2.max_steps=1"]
    r = run_train(sets + again)
    assert r.returncode == 0, r.stderr[-3000:]
    aside = [f for f in os.listdir(os.path.join(out, "stage2")) if f.startswith("adapter.earlier-")]
    assert not os.path.exists(adapter) and len(aside) == 1
    assert os.path.isfile(os.path.join(out, "stage2", aside[0], "adapter_model.safetensors"))
