"""bench/gpu_check.py runs its every section on CPU at toy sizes, so the one GPU run can't fail on logic."""
import json
import os

import pytest
from helpers import ROOT, run_child

pytestmark = pytest.mark.distributed


def test_gpu_check_smoke_writes_every_number(tmp_path):
    out = tmp_path / "gpu.json"
    proc = run_child([os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke", "--profile", "--out", out], timeout=600,
                     cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["preflight"]["attention"] == "sdpa"
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
    rows = r["trainer"]
    assert [t["engines_after_close"] for t in rows] == [0] * len(rows)  # no variant inherits an engine
    base = [(t["stage"], t["lengths"], t["packed"]) for t in rows[:8]]
    assert base == [(st, ln, pk) for pk in (True, False) for ln in ("full", "ragged") for st in ("stage1", "stage2")]
    arms = {(t["stage"], t["zero"], t["shard_decoder"], t["decoder_checkpointing"]) for t in rows[8:]}
    assert arms == {(st, *arm) for st in ("stage1", "stage2")
                    for arm in ((3, False, False), (3, False, "half"), (2, False, True), (3, True, True))}
    profile = (tmp_path / "profile.txt").read_text()  # beside --out: what a device call brings back
    for t in rows:
        assert "error" not in t and "skipped" not in t, t
        assert t["tokens_per_s"] > 0 and len(t["losses"]) == 2 and t["hardware_tflops"] > 0
        assert t["shared_prefix"] == (0 if t["shard_decoder"] else 5)  # a sharded decoder reads no prefix
        base_arm = t["zero"] == 3 and not t["shard_decoder"] and t["decoder_checkpointing"] is True
        assert t["loss_ok"] if base_arm and t["lengths"] == "full" else "loss" not in t  # vs the CPU fp32 padded path
        assert (t["padding_fraction"] > 0.05) == (t["lengths"] == "ragged") and t["padding_fraction"] >= 0
        assert f"== {t['variant']}\n" in profile
    packed = {(t["stage"], t["lengths"]): t for t in rows[:8] if t["packed"]}
    for t in rows:
        p = packed[t["stage"], t["lengths"]]
        if not t["packed"]:  # the same rows: the same losses, packed or not; padded runs more FLOPs on ragged rows
            assert t["losses"] == pytest.approx(p["losses"], rel=1e-4)
            ratio = lambda row: row["hardware_tflops"] / row["model_tflops"]  # noqa: E731
            assert ratio(t) > ratio(p) * 1.05 if t["lengths"] == "ragged" else ratio(t) == pytest.approx(ratio(p))
        elif not t["shard_decoder"]:  # ZeRO-2 and the decoder's checkpointing change where work runs, not the step
            assert t["losses"] == pytest.approx(p["losses"], rel=1e-5)


def test_one_failing_variant_costs_only_its_row_and_the_deadline_skips_the_rest(tmp_path, monkeypatch):
    """gpu_check writes its JSON after every variant, records a variant's error in its row and goes
    on, and starts nothing that would end past --deadline-s."""
    import time
    from types import SimpleNamespace

    from helpers import bench_module

    gc, gt = bench_module("gpu_check"), bench_module("gpu_trainer")
    seen = []

    class Bench:  # the real variants, run by a stand-in that fails the second and takes 0.2 s each
        def __init__(self, *args):
            pass

        def run(self, v):
            seen.append(json.loads((tmp_path / "gpu.json").read_text()))
            time.sleep(0.2)
            if len(seen) == 2:
                raise RuntimeError("CUDA out of memory")
            return {"variant": v.label, "attention": "sdpa", "micro_batch": 1, "step_s": 1.0, "tokens_per_step": 1,
                    "tokens_per_s": 1.0, "model_tflops": 1.0, "hardware_tflops": 1.0, "mfu": None,
                    "padding_fraction": 0.0, "peak_memory_GB": None, "attention_kernels": []}

    monkeypatch.setattr(gt, "TrainerBench", Bench)
    results = gc.Results(str(tmp_path / "gpu.json"), {})
    args = SimpleNamespace(smoke=True, steps=1)
    gc.run_trainer(None, "cpu", args, results, time.perf_counter() + 2.5, None)  # nothing starts after 1.5 s
    rows = json.loads((tmp_path / "gpu.json").read_text())["trainer"]
    assert len(rows) == len(gt.variants())
    assert [len(s["trainer"]) for s in seen] == list(range(len(seen)))  # written after every variant
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory" and "error" not in rows[2]
    ran = [r for r in rows if "skipped" not in r]
    assert 4 <= len(ran) <= 8 and all(r == {"variant": r["variant"], "skipped": "deadline"} for r in rows[len(ran):])


def test_the_flop_count_of_a_step_by_hand():
    """token_counts + step_flops (gpu_trainer.py) against counts made by hand: a stage-1 contrast pass
    scores every target twice; the decoder reads BOS + k (compressed tokens and shared prefix) before
    each target; query and positive rows stacked in one encoder pass pad to the wider; a positive held
    as a target (p_no_grad) runs in passes of its own and is counted as forward work only; a share of
    the decoder's layers recomputed adds that share of its forward."""
    from types import SimpleNamespace

    import torch
    from helpers import bench_module

    from autoregembed.method.batches import AlignmentBatch, CandidateBatch

    gc = bench_module("gpu_trainer")
    mask = lambda *lengths: torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])  # noqa: E731
    k, bos = 7, 1  # 5 compressed tokens + a 2-vector prefix, and the decoder's BOS
    s1 = SimpleNamespace(attention_mask=mask(4, 6), target_mask=mask(3, 5), contrast=True)
    assert gc.token_counts(s1, k, bos) == {
        "enc_real": 10, "enc_padded": 12, "dec_real": 2 * 8 + 4 * 8, "dec_padded": 4 * (5 + 8), "scored": 16,
        "fwd_enc_real": 0, "fwd_enc_padded": 0, "fwd_dec_real": 0, "fwd_dec_padded": 0, "fwd_scored": 0}
    zeros = torch.zeros(2, 1)
    c = CandidateBatch(zeros, mask(3, 2), zeros, mask(4, 2), zeros, mask(5, 1, 1), torch.tensor([0, 1, 1]))
    stacked = gc.token_counts(AlignmentBatch(c, zeros, mask(6, 6), zeros, zeros), k, bos)
    assert stacked == {  # 2 queries + 2 positives padded to 6; pos|e_q, pos|e_p, 3 negatives padded to 5
        "enc_real": 5 + 12, "enc_padded": 4 * 6, "dec_real": 2 * 6 + 7 + 7 * 8, "dec_padded": 7 * (5 + 8),
        "scored": 2 * 6 + 7, "fwd_enc_real": 0, "fwd_enc_padded": 0, "fwd_dec_real": 0, "fwd_dec_padded": 0,
        "fwd_scored": 0}
    target = gc.token_counts(AlignmentBatch(c, zeros, mask(6, 6), zeros, zeros, p_no_grad=True), k, bos)
    assert target == {
        "enc_real": 5, "enc_padded": 2 * 3, "dec_real": 6 + 7 + 5 * 8, "dec_padded": 5 * (5 + 8), "scored": 13,
        "fwd_enc_real": 12, "fwd_enc_padded": 12, "fwd_dec_real": 6 + 2 * 8, "fwd_dec_padded": 2 * (4 + 8),
        "fwd_scored": 6}
    n, head = 1000, 50  # layer and head parameters
    assert gc.step_flops(n, head, 10, 20, 5) == 6 * n * 10 + 4 * n * 20 + 4 * head * 5
    assert gc.step_flops(n, head, 10, 20, 5, enc_recompute=True, dec_recompute=1.0) == 8 * n * 10 + 6 * n * 20 + 4 * head * 5
    assert gc.step_flops(n, head, 10, 20, 5, enc_recompute=True, dec_recompute=0.25) \
        == 8 * n * 10 + 4.5 * n * 20 + 4 * head * 5  # a quarter of the decoder's layers recomputed
    assert gc.step_flops(n, head, 10, 20, 5, enc_recompute=True, dec_recompute=1.0, fwd_enc_tokens=3,
                         fwd_dec_tokens=4, fwd_scored=2) \
        == 8 * n * 10 + 6 * n * 20 + 4 * head * 5 + 2 * n * 7 + 2 * head * 2
    moved = gc.step_flops(n, head, target["enc_real"], target["dec_real"], target["scored"],
                           fwd_enc_tokens=target["fwd_enc_real"], fwd_dec_tokens=target["fwd_dec_real"],
                           fwd_scored=target["fwd_scored"])
    assert moved < gc.step_flops(n, head, stacked["enc_real"], stacked["dec_real"], stacked["scored"])


def _wheel(folder, name: str, version: str, requires: list[str], tag: str = "py3-none-any"):
    """A wheel file holding only its METADATA: what check_wheels reads."""
    import zipfile

    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_the_wheel_check_refuses_what_the_image_cannot_resolve(tmp_path):
    """The set carried before (transformers 5.25.0, which needs huggingface-hub >= 2.4, against the
    image's 1.33.0) is refused with the reason; markers and extras that do not apply are left out; a
    carried wheel shadows the image's version; a wheel built for another Python is refused."""
    from helpers import bench_module

    cw = bench_module("check_wheels")
    image = tmp_path / "image.txt"
    image.write_text("# the image\npython==3.12.3\nhuggingface-hub==1.33.0\ntorch==2.11.0\npackaging\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "transformers", "5.25.0", ["huggingface-hub<3.0,>=2.4.0", "packaging>=20.0",
                                           'tensorflow; extra == "tf"', 'pywin32; sys_platform == "win32"'])
    _wheel(bad, "fastkernel", "1.0", ["torch>=2.12"], tag="cp311-cp311-manylinux_2_17_x86_64")
    problems, unverified = cw.check(str(bad), str(image))
    assert problems == [
        "fastkernel-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: no tag installs on CPython 3.12.3 manylinux x86_64",
        "fastkernel-1.0-cp311-cp311-manylinux_2_17_x86_64.whl: needs torch>=2.12, but the image's torch is 2.11.0",
        "transformers-5.25.0-py3-none-any.whl: needs huggingface-hub<3.0,>=2.4.0, but the image's huggingface-hub "
        "is 1.33.0"]
    assert unverified == ["transformers-5.25.0-py3-none-any.whl: needs packaging>=20.0; the image has packaging, "
                          "version not read"]
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "transformers", "5.25.0", ["huggingface-hub<3.0,>=2.4.0"])
    _wheel(good, "huggingface-hub", "2.4.0", ["hf-xet>=1.6"])  # carried, it shadows the image's 1.33.0 ...
    assert cw.check(str(good), str(image))[0] == [  # ... but what it needs in turn must be there too
        "huggingface_hub-2.4.0-py3-none-any.whl: needs hf-xet>=1.6, which is neither carried nor on the image"]
    assert cw.main([str(good), str(image)]) == 1 and cw.main([str(tmp_path / "none"), str(image)]) == 1
    (good / "huggingface_hub-2.4.0-py3-none-any.whl").unlink()
    _wheel(good, "huggingface-hub", "2.4.0", [])
    assert cw.check(str(good), str(image)) == ([], []) and cw.main([str(good), str(image)]) == 0


IMAGE = os.environ.get("AUTOREGEMBED_GPU_IMAGE", os.path.expanduser("~/.cache/autoregembed/gpu-image"))


@pytest.mark.skipif(not os.path.exists(os.path.join(IMAGE, "venv", ".pins")),
                    reason=f"no GPU-image venv at {IMAGE}: bash scripts/setup_gpu_image.sh builds it")
def test_the_gpu_check_dry_run_passes_on_the_images_versions(tmp_path):
    """What a lent GPU machine runs, on CPU: bench/gpu_check.sh --smoke under the image's Python 3.12,
    torch 2.11.0, triton 3.6.0, transformers 5.17.0 and huggingface-hub 1.33.0, with the carried wheels
    installed as the machine installs them (install_carried.sh): the preflight and every variant; then
    the kernel's Hopper PTX checks under the image's Triton."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=os.path.join(IMAGE, "venv", "bin", "python"), WHEELS=os.path.join(IMAGE, "wheels"),
               OUT=str(tmp_path / "out"), SITE=str(tmp_path / "site"), CHECK_DEADLINE_S="500", CHECK_LIMIT_S="600")
    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--smoke"], env=env, cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for version in ("python 3.12", "torch 2.11.0", "triton 3.6.0", "transformers 5.17.0", "deepspeed 0.19.8"):
        assert version in r.stdout, r.stdout[-3000:]
    assert "LOAD REPORT" not in r.stdout + r.stderr  # the device call returns 12,000 characters: results, not noise
    res = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert res["torch"].startswith("2.11.0") and res["triton"] == "3.6.0" and res["errors"] == {}
    assert res["preflight"]["attention"] == "sdpa" and len(res["trainer"]) == 16
    assert all("error" not in t and "skipped" not in t for t in res["trainer"])
    assert all(t["engines_after_close"] == 0 for t in res["trainer"])
    # the Hopper PTX of the row kernel as the image's Triton 3.6 compiles it (no GPU needed)
    ptx = subprocess.run([env["PYTHON"], "-m", "pytest", "-q", "-o", "addopts=-ra", "-p", "no:cacheprovider",
                          "tests/test_kernel_ptx.py"],
                         env={**env, "PYTHONPATH": env["SITE"]}, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert ptx.returncode == 0 and " passed" in ptx.stdout and "skipped" not in ptx.stdout, ptx.stdout[-3000:]
