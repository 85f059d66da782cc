"""The row kernel as an H100 runs it, checked without a GPU: compiled offline for sm_90a, PTX read.

What each assertion rules out: 4-byte loads and stores where 16-byte ones move the same data in a
quarter of the instructions (the kernel is memory-bound), the slow IEEE exponential, atomics,
local-memory traffic and register spills.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def reports():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-m", "autoregembed.kernels.hopper_ptx"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
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
