"""The kernels as an H100 runs them, checked without a GPU: compiled offline for sm_90a, PTX read.

What each assertion rules out: TF32 or fp32 FMAs instead of bf16 tensor cores (half rate or
none), MMAs waited on one at a time, atomics in the backward, register spills in the first
(preferred) autotune configuration of each kernel.
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
    proc = subprocess.run([sys.executable, "-m", "kernels.hopper_ptx"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["kernel"]: r for r in rows}


@pytest.mark.parametrize("kernel", ["fwd", "dz"])
def test_bf16_tensor_cores_async_no_spills_no_atomics(reports, kernel):
    r = reports[kernel]
    assert r["mma"] and all(m.endswith(".f32.bf16.bf16") for m in r["mma"]), r["mma"]  # bf16 in, fp32 acc
    assert not r["tf32"]
    assert r["fma_f32"] < 16  # the epilogue's few scalar FMAs, not an fp32 matmul
    assert 1 in r["wait_depths"]  # the MMA of the next D tile is issued before the previous one is awaited
    assert r["atomics"] == 0 and not r["acq_rel"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert r["registers"] <= 255
