"""Two stage-2 steps under the trainer's ZeRO-3 engine, for test_parity.py:
`parity_worker.py OUT BASE NLI_FILE` (run with torch.distributed.run, 2 ranks).

Rank r takes rows [4s + 2r, 4s + 2r + 2) at step s: the global batch of step s is rows 4s..4s+3.
Rank 0 writes the initial encoder weights, the full encoder gradients of step 1 and both losses.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from autoregembed.runtime import distributed as D  # noqa: E402
from autoregembed.method.batches import alignment_batch, to_device  # noqa: E402
from autoregembed.tools.cli import DEFAULT_DS  # noqa: E402
from autoregembed.runtime.config import load_config  # noqa: E402
from autoregembed.runtime.data import load_rows  # noqa: E402
from autoregembed.runtime.trainer import Session, micro_step  # noqa: E402
from autoregembed.runtime.stages import STAGES  # noqa: E402

SETTINGS = ["model.match_decoder_scale=false", "stage2.micro_batch_size=2", "stage2.warmup_steps=0",
            "stage2.max_steps=2", "stage2.learning_rate=1e-3", "stage2.gradient_clipping=1.0"]


class ConstantReferences:
    def lookup(self, row):
        return -30.0, [-40.0 - i for i in range(len(row["neg"]))]


if __name__ == "__main__":
    out, base, nli = sys.argv[1:4]
    cfg = load_config(None, [f"output_dir={out}", f"model.base={base}", f"data.stage2={nli}", *SETTINGS])
    D.init_distributed()
    s = Session(cfg, STAGES["stage2"], DEFAULT_DS, base, train=True)
    s.engine.train()  # as train_stage does
    enc = s.engine.module.encoder
    with D.gathered(list(enc.parameters())):
        initial = {n: p.detach().clone() for n, p in enc.named_parameters()}
    rows, loss_fn, losses, grads = load_rows(nli, stage=2), STAGES["stage2"].loss(cfg), [], {}
    for step in range(2):
        mine = rows[4 * step + 2 * D.rank() : 4 * step + 2 * D.rank() + 2]
        batch = to_device(alignment_batch(mine, s.text_encoder, ConstantReferences()), s.device)

        def keep_grads(engine, first=step == 0):
            if first:
                grads.update({n: safe_get_full_grad(p).clone() for n, p in enc.named_parameters() if p.requires_grad})

        loss = micro_step(s.engine, batch, loss_fn, after_backward=keep_grads)  # the trainer's own step
        losses.append(D.mean_across_ranks(loss.item()))
    if D.rank() == 0:
        torch.save({"initial": initial, "grads": grads}, f"{out}/tensors.pt")
        json.dump({"losses": losses}, open(f"{out}/losses.json", "w"))
    s.close()
    D.shutdown()
