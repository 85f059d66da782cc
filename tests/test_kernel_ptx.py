"""The row kernel as an H100 runs it, checked without a GPU: compiled offline for sm_90a, PTX read.

What each assertion rules out: 4-byte loads and stores where 16-byte ones move the same data in a
quarter of the instructions (the kernel is memory-bound), the slow IEEE exponential, atomics,
local-memory traffic and register spills.
"""
import json
import os

import pytest
from conftest import run_child


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
    assert "v4.b32" in r["loads"], r  # the logits stream in 16-byte loads
    if kernel == "rows+dz":
        assert "v4.b32" in r["stores"], r  # dZ leaves as 16-byte stores (8 bf16 each)
    assert r["ex2_approx"] > 0
    assert r["atomics"] == 0 and r["local"] == 0
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["registers"] <= 64, r
