"""Two stage-2 optimizer steps of the trainer (``step.optimizer_step``: ZeRO-3, gradient
accumulation 2), for test_parity.py: `parity_worker.py OUT BASE NLI_FILE` (torch.distributed.run, 2 ranks).

Rank r's micro-batch m of step s is row 4s + 2r + m: the global batch of step s is rows 4s..4s+3.
Rank 0 writes the initial encoder weights, the full encoder gradients of step 1 (after its last
micro-batch's backward) and both steps' losses.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from autoregembed.ground import distributed as D  # noqa: E402
from autoregembed.method.batches import alignment_batch  # noqa: E402
from autoregembed.tools.cli import DEFAULT_DS  # noqa: E402
from autoregembed.run.config import load_config  # noqa: E402
from autoregembed.ground.data import load_rows  # noqa: E402
from autoregembed.run.session import RunContext, Session  # noqa: E402
from autoregembed.run.step import optimizer_step  # noqa: E402
from autoregembed.run.stages import stages_for  # noqa: E402

SETTINGS = ["model.match_decoder_scale=false", "stage2.micro_batch_size=1", "stage2.gradient_accumulation_steps=2",
            "stage2.warmup_steps=0",
            "stage2.max_steps=2", "stage2.learning_rate=1e-3", "stage2.gradient_clipping=1.0"]


class ConstantReferences:
    def lookup(self, row):
        return -30.0, [-40.0 - i for i in range(len(row["neg"]))]


if __name__ == "__main__":
    out, base, nli = sys.argv[1:4]
    cfg = load_config(None, [f"output_dir={out}", f"model.base={base}", f"data.stage2={nli}", *SETTINGS])
    D.init_distributed()
    stage2 = stages_for(cfg)["stage2"]
    s = Session(RunContext.of(cfg, DEFAULT_DS), stage2, base, train=True)
    s.engine.train()  # as train_stage does
    enc = s.engine.module.encoder
    with D.gathered(list(enc.parameters())):
        initial = {n: p.detach().clone() for n, p in enc.named_parameters()}
    rows, loss_fn, losses, grads = load_rows(nli, stage=2), stage2.loss(), [], {}
    for step in range(2):
        micro = [alignment_batch([rows[4 * step + 2 * D.rank() + m]], s.text_encoder, ConstantReferences())
                 for m in range(2)]
        backwards = []

        def keep_grads(engine, first=step == 0):  # the step's gradient is whole after its last backward
            backwards.append(1)
            if first and len(backwards) == 2:
                grads.update({n: safe_get_full_grad(p).clone() for n, p in enc.named_parameters() if p.requires_grad})

        loss = optimizer_step(s.engine, micro, loss_fn, after_backward=keep_grads)  # the trainer's own step
        losses.append(D.mean_across_ranks(loss.item()))
    if D.rank() == 0:
        torch.save({"initial": initial, "grads": grads}, f"{out}/tensors.pt")
        json.dump({"losses": losses}, open(f"{out}/losses.json", "w"))
    s.close()
    D.shutdown()
