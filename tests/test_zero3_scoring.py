"""Under ZeRO-3 with the decoder partitioned (model.shard_decoder) the LM head is resident only while
it is used (and found again by a backend whose backward reads it), and every decoder pass (reference
scoring included) goes through the engine's forward, where DeepSpeed gathers and prefetches; and no
engine, nor the process groups' threads, outlives its close."""
import json
import os

import pytest
from helpers import ROOT, run_child

pytestmark = pytest.mark.distributed


SCRIPT = """
import gc, json, os, sys, warnings
warnings.filterwarnings("ignore")
import deepspeed
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from autoregembed.ground import distributed as D
from autoregembed.method.batches import compression_batch, to_device
from autoregembed.run.config import load_config
from autoregembed.ground.data import load_rows
from autoregembed.method.losses import CompressionLoss
from autoregembed.run.stages import stages_for
from autoregembed.run.scoring import score_references
from autoregembed.run.session import RunContext, Session

out, base, stage2 = sys.argv[1:4]
zero3 = {root!r} + "/ds_configs/zero3.json"
cfg = load_config(None, ["output_dir=" + out, "model.base=" + base, "data.stage2=" + stage2,
                         "model.match_decoder_scale=false", "stage2.micro_batch_size=4", "model.shard_decoder=true",
                         "model.shared_prefix=0"])
D.init_distributed()
report = {{}}

# 1. what the scorer keeps between forward and backward
ctx = RunContext.of(cfg, zero3)
s = Session(ctx, stages_for(cfg)["stage1"], ctx.base(), train=True)
head = s.engine.module.head.weight
rows = load_rows(cfg.data.stage1, stage=1)[:4]
batch = to_device(compression_batch(rows, s.text_encoder), s.device)
loss = CompressionLoss()(s.engine(batch), batch)
nodes, seen, todo = [], set(), [loss.grad_fn]
while todo:
    n = todo.pop()
    if n is None or n in seen:
        continue
    seen.add(n)
    if type(n).__name__ == "TokenLogprobsBackward":
        nodes.append(n)
    todo.extend(f for f, _ in n.next_functions)
report["scorer_nodes"] = len(nodes)
report["holds_head"] = any(getattr(n, "weight", None) is not None for n in nodes)
report["head_full_numel"] = head.ds_numel
report["head_numel_after_forward"] = head.numel()
report["head_released_after_forward"] = head.ds_status == ZeroParamStatus.NOT_AVAILABLE
report["largest_saved_tensor"] = max(t.numel() for n in nodes for t in n.saved_tensors)
s.engine.backward(loss)
s.engine.step()
report["loss"], report["grad_norm"] = loss.item(), float(s.engine.get_global_grad_norm())
s.close()

# 1b. cut-cross-entropy reads the head again in its backward: the hooks gather it there too
cce_cfg = load_config(None, ["output_dir=" + out + "/cce", "model.base=" + base, "data.stage2=" + stage2,
                             "model.match_decoder_scale=false", "model.shard_decoder=true", "model.shared_prefix=0",
                             "scorer.kind=cce"])
cce_ctx = RunContext.of(cce_cfg, zero3)
s = Session(cce_ctx, stages_for(cce_cfg)["stage1"], cce_ctx.base(), train=True)
loss = CompressionLoss()(s.engine(batch), batch)
s.engine.backward(loss)
s.engine.step()
report["cce_loss"], report["cce_grad_norm"] = loss.item(), float(s.engine.get_global_grad_norm())
s.close()

# 2. reference scoring calls the engine (not the module behind it)
calls = []
real = DeepSpeedEngine.forward
def spy(self, *a, **kw):
    calls.append(type(a[0]).__name__)
    return real(self, *a, **kw)
DeepSpeedEngine.forward = spy
cfg.paths.stage1_model = ctx.base()
score_references(RunContext.of(cfg, zero3), stages_for(cfg)["reference"])
report["engine_forward_stages"] = sorted(set(calls))
report["engine_forward_calls"] = len(calls)

# 3. nothing outlives what closed it: the three engines above, then the process groups' threads
del s, head, loss, nodes, n, todo, seen  # this script's own references into the first two
gc.collect()
report["engines_left"] = sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())
D.shutdown()
report["comm_threads_left"] = sorted(name for name in (open(f"/proc/self/task/{{t}}/comm").read().strip()
                                                     for t in os.listdir("/proc/self/task"))
                                     if "gloo" in name or "nccl" in name)
json.dump(report, open(out + "/report.json", "w"))
"""


def test_lm_head_is_released_between_forward_and_backward_and_reference_uses_the_engine(tmp_path, tiny_base):
    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(root=ROOT))
    rows = open(os.path.join(ROOT, "autoregembed", "resources", "nli_sample.jsonl")).readlines()[:16]
    stage2 = tmp_path / "s2.jsonl"
    stage2.write_text("".join(rows))
    proc = run_child([script, out, tiny_base, stage2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    r = json.load(open(out / "report.json"))
    assert r["scorer_nodes"] == 1
    # the backward needs no LM head (the Jacobian was formed in the forward): ZeRO-3 has released
    # it, the autograd node holds neither it nor a copy, only a tensor of the hidden states' size
    assert not r["holds_head"]
    assert r["head_released_after_forward"] and r["head_numel_after_forward"] == 0
    assert r["largest_saved_tensor"] < r["head_full_numel"]
    # the same step with scorer.kind=cce: the same loss and gradient (its backward found the head)
    assert r["cce_loss"] == pytest.approx(r["loss"], rel=1e-5)
    assert r["cce_grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-4) and r["grad_norm"] > 0
    # 16 stage-2 rows at micro-batch 4 on one rank: 4 scoring calls, all through the engine
    assert r["engine_forward_stages"] == ["CandidateBatch"]
    assert r["engine_forward_calls"] == 4
    # DeepSpeed's module-level references (session._destroy_engine) and torch's default-argument one
    # (distributed.init_distributed) used to keep every engine and the default group's threads to the exit
    assert r["engines_left"] == 0
    assert r["comm_threads_left"] == []
