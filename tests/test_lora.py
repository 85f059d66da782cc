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
from autoregembed.runtime.config import ConfigError, load_config
from autoregembed.release.encoder import Encoder
from autoregembed.release.export import export_encoder
from autoregembed.release.meta import ExportMeta
from autoregembed.runtime.loading import load_model
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
