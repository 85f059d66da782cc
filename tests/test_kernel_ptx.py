"""The row kernel as an H100 runs it, checked without a GPU: compiled offline for sm_90a, PTX read.

What each assertion rules out: 4-byte loads and stores where 16-byte ones move the same data in a
quarter of the instructions (the kernel is memory-bound), the slow IEEE exponential, atomics,
local-memory traffic and register spills.
"""
import json
import os

import pytest
from helpers import run_child


@pytest.fixture(scope="module")
def reports():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = run_child(["-m", "autoregembed.kernels.hopper_ptx"], env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["kernel"]: r for r in rows}


@pytest.mark.parametrize("kernel", ["rows", "rows+dz"])
def test_vector_memory_access_fast_exp_no_spills(reports, kernel):
    r = reports[kernel]
    # every load of the logits streams in 16-byte instructions: the only scalar fp32 load is the
    # target logit's gather, the only 8-byte one the label; the only scalar stores are LSE and TGT
    assert r["loads"].get("v4.b32", 0) >= 4 and r["loads"].get("v1.b32") == 1 and r["loads"].get("v1.b64") == 1, r
    assert set(r["loads"]) == {"v1.b32", "v1.b64", "v4.b32"}, r
    assert r["stores"].get("v1.b32") == 2 and set(r["stores"]) <= {"v1.b32", "v4.b32"}, r
    if kernel == "rows+dz":
        assert r["stores"].get("v4.b32", 0) >= 2, r  # dZ leaves as 16-byte stores (8 bf16 each)
    assert r["ex2_approx"] > 0
    assert r["atomics"] == 0 and r["local"] == 0
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["registers"] <= 64, r


@pytest.mark.parametrize("kernel", ["rows odd-V", "rows+dz odd-V"])
def test_an_odd_vocabulary_streams_whole_blocks_in_16_byte_loads(reports, kernel):
    """V=50257: rows padded to aligned strides (logprobs.padded_rows), whole blocks unmasked; only
    the one tail block, at most BLOCK elements of a row, goes scalar."""
    r, aligned = reports[kernel], reports[kernel.replace(" odd-V", "")]
    per_thread = r["block"] // (32 * r["warps"])  # elements of a block per thread: one tail's scalar loads
    passes = 2 if "dz" in kernel else 1
    assert r["loads"].get("v4.b32", 0) >= aligned["loads"]["v4.b32"] // 2, r  # the main loop, vectorised
    assert r["loads"].get("v1.b32", 0) <= passes * per_thread + 1, r
    if "dz" in kernel:
        assert r["stores"].get("v4.b32", 0) >= 1, r
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local"] == 0, r
