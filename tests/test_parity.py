"""Two stage-2 optimizer steps of the trainer (2 ZeRO-3 ranks, gradient accumulation 2) equal plain
single-process PyTorch on the same global batch: the loss of both steps and the encoder's gradients
of the first, within 1e-5."""
import json
import os

import pytest
import torch
from helpers import ROOT, run_child
from parity_worker import SETTINGS, ConstantReferences

from autoregembed.method.batches import alignment_batch
from autoregembed.run.config import load_config
from autoregembed.ground.data import load_rows
from autoregembed.run.loading import load_model
from autoregembed.method.tokenization import TextEncoder

pytestmark = pytest.mark.distributed


def test_two_zero3_ranks_train_stage2_exactly_as_plain_pytorch(tmp_path, tiny_base):
    nli = tmp_path / "nli.jsonl"
    nli.write_text("".join(open(os.path.join(ROOT, "autoregembed", "resources", "nli_sample.jsonl")).readlines()[:8]))
    out = tmp_path / "run"
    out.mkdir()
    r = run_child([os.path.join(ROOT, "tests", "parity_worker.py"), out, tiny_base, nli], ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    zero3 = torch.load(out / "tensors.pt")
    zero3_losses = json.load(open(out / "losses.json"))["losses"]

    from autoregembed.run.session import lr_factor

    cfg = load_config(None, [f"model.base={tiny_base}", f"data.stage2={nli}", *SETTINGS])
    o = cfg.stage2
    model, tok = load_model(tiny_base, tiny_base, cfg.model.num_embed_tokens, torch.float32, "sdpa",
                            gradient_checkpointing=True, decoder_bos=cfg.model.decoder_bos)
    model.encoder.load_state_dict(zero3["initial"])  # the same start (the EMBED rows are drawn at random)
    model.train()
    te = TextEncoder(tok, cfg.model.num_embed_tokens, cfg.data.max_text_len, cfg.data.max_target_len)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=o.learning_rate, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(o.lr_schedule, o.warmup_steps, o.max_steps))
    rows, loss_fn = load_rows(str(nli), stage=2), cfg.loss.objective
    for step in range(2):
        batch = alignment_batch(rows[4 * step : 4 * step + 4], te, ConstantReferences())
        loss = loss_fn(model(batch), batch)
        loss.backward()
        assert loss.item() == pytest.approx(zero3_losses[step], rel=1e-5, abs=1e-6), step
        if step == 0:
            grads = {n: p.grad for n, p in model.encoder.named_parameters() if p.requires_grad}
            assert grads.keys() == zero3["grads"].keys()
            for n, g in grads.items():
                torch.testing.assert_close(zero3["grads"][n], g, rtol=1e-5, atol=1e-5, msg=n)
        torch.nn.utils.clip_grad_norm_(trainable, o.gradient_clipping)
        opt.step()
        sched.step()
        opt.zero_grad()
