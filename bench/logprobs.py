"""Peak memory and time of per-token log-likelihoods: naive vs fused, side by side in one run.

    python bench/logprobs.py            # the default grid (includes V=32000, M=8192, D=2048)
    python bench/logprobs.py --full     # adds V=128256 at D=4096 and M=16384 (slow on 2 cores)

naive  = log_softmax(H @ W.T).gather(y)          (materialises [M, V] twice)
fused  = autoregembed.method.logprobs.token_logprobs    (token chunks of logits, Jacobian formed in the forward)
floor  = H @ W.T alone                           (the matmul every method must pay)

Each measurement runs in a fresh process so that peak RSS belongs to that method alone:
peak = (VmHWM after the call, reset just before it) - (RSS with the inputs allocated).  Ratios are printed
for the forward pass (the acceptance targets) and for forward+backward.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from harness import json_child, reset_rss_peak, status_kb  # bench/harness.py, beside this script

DEFAULT_GRID = [(32000, 8192, 2048), (32000, 16384, 576), (128256, 4096, 576), (128256, 2048, 2048)]
FULL_GRID = DEFAULT_GRID + [(32000, 16384, 4096), (128256, 16384, 4096)]


def measure(method: str, v: int, m: int, d: int, backward: bool, repeats: int) -> dict:
    """Runs in the child process."""
    import torch

    from autoregembed.method.logprobs import token_logprobs

    torch.manual_seed(0)
    h = torch.randn(m, d) / d**0.25
    w = torch.randn(v, d) / d**0.25
    y = torch.randint(0, v, (m,))
    g = torch.randn(m)
    if backward:
        h.requires_grad_()

    def naive():
        return torch.log_softmax(h @ w.T, dim=-1).gather(1, y[:, None])[:, 0]

    fn = {"naive": naive, "fused": lambda: token_logprobs(h, w, y), "floor": lambda: h @ w.T}[method]
    # Warm up the BLAS/threading runtime on a small problem so its one-off buffers are not counted.
    hs = h.detach()[:64].clone().requires_grad_(backward)
    (torch.log_softmax(hs @ w[:4096].T, -1).sum() + token_logprobs(hs, w[:4096], y[:64] % 4096).sum())
    del hs
    base = status_kb("VmRSS")
    reset_rss_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        if backward:
            (fn() * g).sum().backward()
            h.grad = None
        else:
            with torch.no_grad():
                out = fn()
            del out
        times.append(time.perf_counter() - t0)
    peak = status_kb("VmHWM")
    return {"time": min(times), "peak_bytes": max(0, peak - base) * 1024}


def run_child(method, v, m, d, backward, repeats) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    return json_child([sys.executable, __file__, "--child", method, str(v), str(m), str(d), str(int(backward)),
                       str(repeats)], env)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--no-backward", action="store_true", help="skip the forward+backward columns")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, v, m, d, bwd, rep = args.child
        print(json.dumps(measure(method, int(v), int(m), int(d), bool(int(bwd)), int(rep))))
        return
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    rows = []
    hdr = (f"{'V':>7} {'M':>6} {'D':>5} | {'naive MB':>9} {'fused MB':>9} {'mem naive/fused':>15} | "
           f"{'floor s':>8} {'naive s':>8} {'fused s':>8} {'fused/floor':>11} | {'f+b naive/fused mem':>19} {'f+b fused/naive time':>20}")
    print(hdr)
    print("-" * len(hdr))
    for v, m, d in (FULL_GRID if args.full else DEFAULT_GRID):
        need = 3 * m * v * 4  # naive forward+backward: logits, log_softmax, their gradient
        r = {"V": v, "M": m, "D": d}
        for method in ("floor", "naive", "fused"):
            if method == "naive" and need > 0.8 * avail:
                r[method] = None
                continue
            r[method] = run_child(method, v, m, d, False, args.repeats)
        if not args.no_backward:
            for method in ("naive", "fused"):
                skip = method == "naive" and need > 0.8 * avail
                r[method + "_fb"] = None if skip else run_child(method, v, m, d, True, 1)
        rows.append(r)
        mb = lambda x: f"{x['peak_bytes'] / 2**20:9.0f}" if x else f"{'skipped':>9}"  # noqa: E731
        ratio = lambda a, b, k: (a[k] / max(b[k], 1)) if a and b else float("nan")  # noqa: E731
        fb_mem = ratio(r.get("naive_fb"), r.get("fused_fb"), "peak_bytes")
        fb_time = ratio(r.get("fused_fb"), r.get("naive_fb"), "time")
        print(f"{v:>7} {m:>6} {d:>5} | {mb(r['naive'])} {mb(r['fused'])} "
              f"{ratio(r['naive'], r['fused'], 'peak_bytes'):15.1f} | {r['floor']['time']:8.2f} "
              f"{r['naive']['time'] if r['naive'] else float('nan'):8.2f} {r['fused']['time']:8.2f} "
              f"{r['fused']['time'] / r['floor']['time']:11.2f} | {fb_mem:19.1f} {fb_time:20.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
