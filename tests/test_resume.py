"""Checkpoints: an interrupted-then-resumed stage retraces the uninterrupted loss exactly."""
import json
import os

import pytest
import torch

from helpers import ROOT, TINY_BASE, run_child

pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("default_tiny_base")]


PREAMBLE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
from autoregembed.ground import distributed as D
from autoregembed.run.config import load_config
from autoregembed.run.stages import stages_for
from autoregembed.run.session import RunContext
from autoregembed.run.trainer import export_stage, train_stage
out, stop_after, extra = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cfg = load_config(None, ["output_dir=" + out, "stage1.max_steps=6",
                         "stage1.micro_batch_size=4", "stage1.warmup_steps=2", "stage1.keep_last=1", *extra])
D.init_distributed()
ctx, stages = RunContext.of(cfg, {root!r} + "/ds_configs/zero3.json"), stages_for(cfg)
"""
TRAIN = PREAMBLE + """
if stop_after:
    cfg.stage1.stop_after = stop_after
    assert train_stage(ctx, stages["stage1"]).status == "stopped"
    cfg.stage1.stop_after = None
assert train_stage(ctx, stages["stage1"], resume=True).status == "done"
D.shutdown()
"""
EXPORT = PREAMBLE + """
export_stage(ctx, stages[cfg.paths.export_from])
D.shutdown()
"""


def _python(script, out, stop_after, extra):
    proc = run_child(["-c", script.format(root=ROOT), out, stop_after, f"model.base={TINY_BASE['path']}", *extra])
    assert proc.returncode == 0, proc.stderr[-4000:]


def _run(out, stop_after, extra=()):
    _python(TRAIN, out, stop_after, extra)
    records = [json.loads(line) for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]
    return {r["step"]: (r["loss"], r["lr"]) for r in records}, [r["step"] for r in records]


LORA = ["model.lora_rank=4", "stage1.learning_rate=1e-2"]


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, extra):
    straight, _ = _run(str(tmp_path / "a"), 0, extra)
    resumed, steps = _run(str(tmp_path / "b"), 3, extra)
    assert steps == [1, 2, 3, 4, 5, 6]  # the second run started at step 4: nothing was redone
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step][0] == pytest.approx(straight[step][0], rel=1e-6, abs=1e-7), step
        assert resumed[step][1] == pytest.approx(straight[step][1])
    ckpts = [n for n in os.listdir(tmp_path / "b" / "stage1" / "checkpoints") if n.startswith("step")]
    assert ckpts == ["step00000006"]  # keep_last=1 pruned step 3; no .partial left behind
    assert open(tmp_path / "b" / "stage1" / "checkpoints" / "latest").read() == "step00000006"


def test_reexport_of_a_lora_stage1_equals_its_own_export(tmp_path):
    """Re-exporting from the checkpoint must re-apply the decoder scale: under LoRA the scaled
    final norm is frozen, so it is not in the checkpoint (decoder_scale.py)."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    _run(out, 0, LORA)
    model_dir = os.path.join(out, "stage1", "model")

    def weights():
        files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
        return {k: v for f in files for k, v in load_file(os.path.join(model_dir, f)).items()}

    first = weights()
    os.rename(model_dir, model_dir + ".first")
    _python(EXPORT, out, 0, [*LORA, "paths.export_from=stage1"])
    again = weights()
    assert sorted(again) == sorted(first)
    assert "norm.weight" in first  # the rescaled final norm is among what is compared
    for k in first:
        assert torch.allclose(again[k], first[k], rtol=1e-6, atol=1e-7), k
