"""bench/gpu_check.py runs its every section on CPU at toy sizes, so the one GPU run can't fail on logic."""
import json
import os

import pytest
from conftest import run_child

pytestmark = pytest.mark.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_smoke_writes_every_number(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_child([os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out", out], timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {}
    assert [(k["impl"], k["ok"]) for k in r["kernels"]] == [("ours", True)] * 2  # vs float64, two shapes
    for row in r["timing"]:
        assert {"matmul_1", "matmul_2", "ours", "ours_fb", "naive", "naive_fb"} <= set(row["ms"])
        assert row["peak_MB"]["ours_fb"] >= 0 and row["ours_fwd_over_matmul"] > 0
    assert [t["stage"] for t in r["trainer"]] == ["stage1", "stage2"]
    for t in r["trainer"]:
        assert t["loss_ok"] and t["tokens_per_s"] > 0 and len(t["losses"]) == 2
