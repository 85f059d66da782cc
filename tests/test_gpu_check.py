"""bench/gpu_check.py runs its every section on CPU at toy sizes, so the one GPU run can't fail on logic."""
import json
import os

import pytest
from helpers import ROOT, run_child

pytestmark = pytest.mark.distributed


def test_gpu_check_smoke_writes_every_number(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_child([os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--out", out], timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {}
    # every scorer backend vs float64 (cut-cross-entropy is in requirements.txt), two shapes
    assert [(k["impl"], k["ok"]) for k in r["kernels"]] == [("ours", True), ("cce", True)] * 2
    assert [row["distribution"] for row in r["timing"]] == ["flat", "peaked"] * 2
    for row in r["timing"]:
        assert {"matmul_1", "matmul_2", "ours", "ours_fb", "naive", "naive_fb"} <= set(row["ms"])
        assert row["peak_MB"]["ours_fb"] >= 0 and row["ours_fwd_nograd_over_matmul"] > 0
        for arm in ("ours", "naive"):  # every arm against float64
            assert row["errors"][arm]["grad_rel"] < 1e-5 and row["errors"][arm]["logprob_abs"] < 1e-4
    flat, peaked = r["timing"][:2]
    assert peaked["largest_probability_median"] > 2 * flat["largest_probability_median"]
    variants = [(t["stage"], t["lengths"], t["packed"]) for t in r["trainer"]]
    assert variants == [(st, ln, pk) for st in ("stage1", "stage2") for ln in ("full", "ragged") for pk in (True, False)]
    for t in r["trainer"]:
        assert t["tokens_per_s"] > 0 and len(t["losses"]) == 2 and t["hardware_tflops"] > 0
        assert t["shared_prefix"] == 5  # the trainer's default decoder input, in the step and in its reference
        assert t["loss_ok"] if t["lengths"] == "full" else "loss" not in t  # vs the CPU fp32 padded path
        assert (t["padding_fraction"] > 0.05) == (t["lengths"] == "ragged") and t["padding_fraction"] >= 0
    packed = {(t["stage"], t["lengths"]): t for t in r["trainer"] if t["packed"]}
    for t in r["trainer"]:
        if not t["packed"]:  # the same rows: the same losses, packed or not; padded runs more FLOPs on ragged rows
            p = packed[t["stage"], t["lengths"]]
            assert t["losses"] == pytest.approx(p["losses"], rel=1e-4)
            ratio = lambda row: row["hardware_tflops"] / row["model_tflops"]  # noqa: E731
            assert ratio(t) > ratio(p) * 1.05 if t["lengths"] == "ragged" else ratio(t) == pytest.approx(ratio(p))
