"""Compile the row kernel for an H100 (sm_90a) on any machine and report what the PTX says.

    python -m autoregembed.kernels.hopper_ptx

Prints one JSON line per variant (with and without dZ): the widths of its global loads and
stores (a memory-bound kernel must move 16 bytes per instruction), whether the exponentials
use the hardware ``ex2.approx``, atomics, registers and spill bytes from ptxas.  Triton's wheel
ships the ptxas it uses for sm_90, so no GPU or CUDA toolkit is needed.  Refuses to run under
``TRITON_INTERPRET=1`` (the interpreter replaces the compiler).
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

from . import logit_rows as K

_SIGNATURE = {"Z": "*fp32", "Y": "*i64", "LSE": "*fp32", "TGT": "*fp32", "DZ": "*bf16",
              "V": "i32", "stride_z": "i32", "stride_dz": "i32", "BLOCK": "constexpr", "GRAD": "constexpr"}
_ALIGNED = ("Z", "DZ", "V", "stride_z", "stride_dz")  # as Triton specialises them for LLM vocabularies


def compile_sm90(grad: bool, aligned_vocab: bool = True) -> "triton.compiler.CompiledKernel":
    """The row kernel as launched for bf16 dZ, compiled for sm_90a; ``aligned_vocab`` False: as
    Triton specialises it for a vocabulary not divisible by 16 (GPT-2's 50257), whose rows the
    scorer lays out with padded strides (logprobs.padded_rows)."""
    names = list(_SIGNATURE)
    aligned = _ALIGNED if aligned_vocab else tuple(n for n in _ALIGNED if n != "V")
    src = ASTSource(K._rows_kernel, _SIGNATURE,
                    constexprs={(names.index("BLOCK"),): K.BLOCK, (names.index("GRAD"),): grad},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": K.NUM_WARPS})


def _ptxas_report(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the assembler Triton's runtime runs for sm_90 (which one varies by release)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = re.search(r"Used (\d+) registers", log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def summarise(ptx: str) -> dict:
    """What a GPU engineer reads first in the PTX of a memory-bound row kernel."""
    loads = re.findall(r"\bld\.global(?:\.[a-z_]+)*?(?:\.(v[248]))?\.([bfsu]\d+)", ptx)
    stores = re.findall(r"\bst\.global(?:\.[a-z_]+)*?(?:\.(v[248]))?\.([bfsu]\d+)", ptx)
    count = lambda found: {k: [f"{v or 'v1'}.{t}" for v, t in found].count(k)  # noqa: E731
                           for k in sorted({f"{v or 'v1'}.{t}" for v, t in found})}
    return {
        "loads": count(loads),  # instruction kind -> how many in the PTX
        "stores": count(stores),
        "ex2_approx": len(re.findall(r"\bex2\.approx", ptx)),
        "atomics": len(re.findall(r"\b(?:atom|red)\.global", ptx)),
        "local": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
    }


def report() -> list[dict]:
    out = []
    for aligned in (True, False):
        for grad in (False, True):
            compiled = compile_sm90(grad, aligned)
            ptx = compiled.asm["ptx"]
            out.append({"kernel": ("rows+dz" if grad else "rows") + ("" if aligned else " odd-V"), "block": K.BLOCK,
                        "warps": K.NUM_WARPS, **summarise(ptx), **_ptxas_report(ptx)})
    return out


def main():
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if K.INTERPRETED:
        raise SystemExit("run with TRITON_INTERPRET=0: the interpreter replaces the compiler")
    for row in report():
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
