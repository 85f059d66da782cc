"""The shipped DeepSpeed configs other than ZeRO-3 run the whole pipeline too."""
import os
from helpers import ROOT, run_child
import pytest

pytestmark = pytest.mark.distributed


def test_zero2_pipeline_including_forward_only_sessions(tmp_path, default_tiny_base):
    """ZeRO-2 refuses an engine without an optimizer; the forward-only sessions (stage-1
    calibration, reference scoring) must still run."""
    out = str(tmp_path / "run")
    proc = run_child([os.path.join(ROOT, "train.py"), "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json"),
                      "--set", f"output_dir={out}", "--set", f"model.base={default_tiny_base}", "--set", "stage1.max_steps=3",
                      "--set", "stage2.max_steps=3", "--set", "stage=pipeline"], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "final-norm scale" in proc.stdout
    assert os.path.exists(os.path.join(out, "reference", "scores.safetensors"))
    assert os.path.exists(os.path.join(out, "stage2", "model", "autoregembed.json"))
    assert "STS Spearman" in proc.stdout
