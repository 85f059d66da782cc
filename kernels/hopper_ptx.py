"""Compile the kernels for an H100 (sm_90a) on any machine and report what the PTX says.

    TRITON_INTERPRET=0 python -m kernels.hopper_ptx          # first configuration of each kernel
    TRITON_INTERPRET=0 python -m kernels.hopper_ptx --all    # every autotune configuration

Prints one JSON line per (kernel, configuration): tensor-core instruction shapes, whether any
TF32 or atomic instruction appears, the ``wgmma.wait_group`` depths (1 = the next MMA overlaps the
loads), registers and spill bytes from ptxas.  Triton's wheel ships the ptxas it uses for sm_90,
so no GPU or CUDA toolkit is needed.  Must run with the interpreter off (the variable is read
when ``kernels`` is imported).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import token_logprobs as K

_POINTERS = {"H": "*bf16", "W": "*bf16", "Y": "*i64", "DZ": "*bf16",
             "LSE": "*fp32", "G": "*fp32", "PMAX": "*fp32", "PSUM": "*fp32", "PTGT": "*fp32"}
_INT_ARGS = ("M", "V", "D", "stride_h", "stride_w", "stride_dz", "M_BUCKET")
_ALIGNED = ("D", "V", "stride_h", "stride_w", "stride_dz")  # multiples of 16 for LLM shapes


def _signature(jit) -> dict:
    return {n: _POINTERS.get(n) or ("i32" if n in _INT_ARGS else "constexpr") for n in jit.arg_names}


def compile_sm90(kernel, config: tuple) -> "triton.compiler.CompiledKernel":
    """Compile an autotuned kernel of token_logprobs for sm_90a with bf16 inputs and D % BLOCK_D == 0."""
    bm, bv, bd, warps, stages = config
    jit = kernel.fn
    while not isinstance(jit, triton.runtime.jit.JITFunction):  # unwrap autotune/heuristics
        jit = jit.fn
    consts = {"BLOCK_M": bm, "BLOCK_V": bv, "BLOCK_D": bd, "EVEN_D": True, "UPCAST": False, "IEEE": False,
              "GROUP": K.GROUP_M}
    sig = _signature(jit)
    names = list(sig)
    src = ASTSource(jit, sig, constexprs={(names.index(k),): v for k, v in consts.items() if k in names},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names
                           if sig[n].startswith("*") or n in _ALIGNED})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": warps, "num_stages": stages})


def _ptxas_report(ptx: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    if not os.path.exists(ptxas):  # older wheels name the sm_90 assembler plainly
        ptxas = os.path.join(os.path.dirname(ptxas), "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def summarise(ptx: str) -> dict:
    """What a GPU engineer reads first in the PTX of a matmul-shaped kernel."""
    return {
        "mma": sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+\.\w+\.\w+\.\w+)", ptx))),
        "tf32": "tf32" in ptx,
        "atomics": len(re.findall(r"\b(?:atom|red)\.global", ptx)),
        "acq_rel": bool(re.search(r"\b(?:atom|red)\.[\w.]*acq_rel", ptx)),
        "wait_depths": sorted(set(int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx))),
        "fma_f32": len(re.findall(r"\bfma\.rn\.f32", ptx)),
    }


def report(all_configs: bool = False) -> list[dict]:
    out = []
    for name, kernel, table in (("fwd", K._fwd_kernel, K.FWD_CONFIGS), ("dz", K._dz_kernel, K.DZ_CONFIGS)):
        for config in table if all_configs else table[:1]:
            compiled = compile_sm90(kernel, config)
            ptx = compiled.asm["ptx"]
            out.append({"kernel": name, "config": list(config), "shared_bytes": compiled.metadata.shared,
                        **summarise(ptx), **_ptxas_report(ptx)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every autotune configuration, not only the first")
    args = ap.parse_args()
    if K.INTERPRETED:
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter replaces the compiler")
    for row in report(args.all):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
