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


def test_the_flop_count_of_a_step_by_hand():
    """_token_counts + _step_flops against counts made by hand: a stage-1 contrast pass scores every target
    twice; the decoder reads BOS + k (compressed tokens and shared prefix) before each target; query and
    positive rows stacked in one encoder pass pad to the wider; a positive held as a target (p_no_grad)
    runs in passes of its own and is counted as forward work only."""
    from types import SimpleNamespace

    import torch
    from helpers import bench_module

    from autoregembed.method.batches import AlignmentBatch, CandidateBatch

    gc = bench_module("gpu_check")
    mask = lambda *lengths: torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])  # noqa: E731
    k, bos = 7, 1  # 5 compressed tokens + a 2-vector prefix, and the decoder's BOS
    s1 = SimpleNamespace(attention_mask=mask(4, 6), target_mask=mask(3, 5), contrast=True)
    assert gc._token_counts(s1, k, bos) == {
        "enc_real": 10, "enc_padded": 12, "dec_real": 2 * 8 + 4 * 8, "dec_padded": 4 * (5 + 8), "scored": 16,
        "fwd_enc_real": 0, "fwd_enc_padded": 0, "fwd_dec_real": 0, "fwd_dec_padded": 0, "fwd_scored": 0}
    zeros = torch.zeros(2, 1)
    c = CandidateBatch(zeros, mask(3, 2), zeros, mask(4, 2), zeros, mask(5, 1, 1), torch.tensor([0, 1, 1]))
    stacked = gc._token_counts(AlignmentBatch(c, zeros, mask(6, 6), zeros, zeros), k, bos)
    assert stacked == {  # 2 queries + 2 positives padded to 6; pos|e_q, pos|e_p, 3 negatives padded to 5
        "enc_real": 5 + 12, "enc_padded": 4 * 6, "dec_real": 2 * 6 + 7 + 7 * 8, "dec_padded": 7 * (5 + 8),
        "scored": 2 * 6 + 7, "fwd_enc_real": 0, "fwd_enc_padded": 0, "fwd_dec_real": 0, "fwd_dec_padded": 0,
        "fwd_scored": 0}
    target = gc._token_counts(AlignmentBatch(c, zeros, mask(6, 6), zeros, zeros, p_no_grad=True), k, bos)
    assert target == {
        "enc_real": 5, "enc_padded": 2 * 3, "dec_real": 6 + 7 + 5 * 8, "dec_padded": 5 * (5 + 8), "scored": 13,
        "fwd_enc_real": 12, "fwd_enc_padded": 12, "fwd_dec_real": 6 + 2 * 8, "fwd_dec_padded": 2 * (4 + 8),
        "fwd_scored": 6}
    n, head = 1000, 50  # layer and head parameters
    assert gc._step_flops(n, head, 10, 20, 5) == 6 * n * 10 + 4 * n * 20 + 4 * head * 5
    assert gc._step_flops(n, head, 10, 20, 5, recompute=True) == 8 * n * 10 + 6 * n * 20 + 4 * head * 5
    assert gc._step_flops(n, head, 10, 20, 5, recompute=True, fwd_enc_tokens=3, fwd_dec_tokens=4, fwd_scored=2) \
        == 8 * n * 10 + 6 * n * 20 + 4 * head * 5 + 2 * n * 7 + 2 * head * 2
    moved = gc._step_flops(n, head, target["enc_real"], target["dec_real"], target["scored"],
                           fwd_enc_tokens=target["fwd_enc_real"], fwd_dec_tokens=target["fwd_dec_real"],
                           fwd_scored=target["fwd_scored"])
    assert moved < gc._step_flops(n, head, stacked["enc_real"], stacked["dec_real"], stacked["scored"])
