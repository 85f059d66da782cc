"""gpu_check's scorer sections: the LM-head scorer against float64, and side by side with the bare
matmul, naive log-softmax, Liger's fused linear cross-entropy and cut-cross-entropy (speed, peak
memory, error), at the vocabularies our users train with (32000 and 128256, D 4096, M 16384)."""
from __future__ import annotations

import math
import time


def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(torch, fn, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA: triton's do_bench, L2 flushed between calls)."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=3, rep=max(reps * 10, 50), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def peak_bytes(torch, fn) -> int:
    """Peak bytes allocated above what was allocated before ``fn``."""
    if torch.cuda.is_available():
        _sync(torch)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(torch)
        return torch.cuda.max_memory_allocated() - base
    from harness import peak_allocated_bytes

    return peak_allocated_bytes(fn)[1]


def _inputs(torch, v, m, d, dtype, device, seed=0, peaked=False):
    """Random hidden states, head and targets.  Flat: the softmax is near uniform (largest
    probability ~0.015 at V=32k), the worst case for cut-cross-entropy's gradient filter.  Peaked:
    like a trained LM's, each target well ahead of the rest (probability ~0.5)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(m, d, device=device, generator=g)
    w = torch.randn(v, d, device=device, generator=g) * (2.0 / d**0.5)
    y = torch.randint(0, v, (m,), device=device, generator=g)
    if peaked:  # the logit of y raised by log(V) + 2 (the logits' spread is ~2): h moves along y's row
        norm = w[y].norm(dim=1, keepdim=True)
        h = h + w[y] / norm * ((math.log(v) + 2.0) / norm)
    return h.to(dtype), w.to(dtype), y


def float64_reference(torch, h, w, y, g, rows: int = 2048):
    """log p(y) and g * dlog p(y)/dh in float64, ``rows`` tokens at a time."""
    w64 = w.double()
    lp = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    grad = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    for s in range(0, h.shape[0], rows):
        h64 = h[s : s + rows].double()
        logits = h64 @ w64.T
        lse = torch.logsumexp(logits, 1)
        yy = y[s : s + rows]
        lp[s : s + rows] = logits.gather(1, yy[:, None])[:, 0] - lse
        p = torch.exp(logits - lse[:, None])
        del logits
        gg = g[s : s + rows].double()
        grad[s : s + rows] = gg[:, None] * (w64[yy] - p @ w64)
        del p
    return lp, grad


def _backends() -> dict:
    """The scorer backends to check (scorers.py): ours, and cut-cross-entropy where it is installed."""
    from autoregembed.method.scorers import scorer_for

    names = {"ours": "auto"}
    try:
        import cut_cross_entropy  # noqa: F401

        names["cce"] = "cce"
    except ImportError:
        pass
    return {label: scorer_for(name) for label, name in names.items()}


def check_kernels(torch, shapes, device) -> list[dict]:
    out = []
    for v, m, d in shapes:
        h, w, y = _inputs(torch, v, m, d, torch.bfloat16, device)
        g = torch.randn(m, device=device, generator=torch.Generator(device=device).manual_seed(1))
        ref_lp, ref_grad = float64_reference(torch, h, w, y, g)
        for label, backend in _backends().items():
            hg = h.clone().requires_grad_()
            lp = backend.token_logprobs(hg, w, y)
            (lp * g).sum().backward()
            lp_err = (lp.detach().double() - ref_lp).abs().max().item()
            grad_err = (hg.grad.double() - ref_grad).abs().max().item()
            grad_rel = grad_err / max(ref_grad.abs().max().item(), 1e-30)
            row = {"impl": label, "V": v, "M": m, "D": d, "dtype": "bf16", "logprob_max_abs_err": lp_err,
                   "grad_max_abs_err": grad_err, "grad_max_rel_err": grad_rel,
                   "ok": lp_err <= 1e-2 and grad_rel <= 1e-2}
            out.append(row)
            print(f"  {label:<5} V={v:>6} M={m:>5} D={d:>4}: |dlogp| {lp_err:.2e}  |dgrad| {grad_err:.2e} "
                  f"(rel {grad_rel:.2e})  {'ok' if row['ok'] else 'FAIL'}", flush=True)
            del hg, lp
        del h, w, y, g, ref_lp, ref_grad
    return out


def _arms(torch, h, w, y, g):
    """name -> (forward fn, forward+backward fn or None, per_token): per-token arms return log p(y_t)
    (the forward+backward weights them by g), summed arms return sum_t -log p(y_t) (Liger and
    cut-cross-entropy, which cannot give stage 2 its per-sequence scores)."""
    from autoregembed.method.logprobs import token_logprobs

    hg = h.detach().clone().requires_grad_()

    def fb(lp_fn):  # per-token log-probabilities, weighted by g
        def run():
            hg.grad = None
            (lp_fn(hg) * g).sum().backward()
        return run

    def fb_loss(loss_fn):  # a summed cross-entropy (what Liger and CCE return)
        def run():
            hg.grad = None
            loss_fn(hg).backward()
        return run

    def naive(x):
        return torch.log_softmax((x @ w.T).float(), -1).gather(1, y[:, None])[:, 0]

    arms = {
        "matmul_1": (lambda: h @ w.T, None, None),
        "ours": (lambda: token_logprobs(h, w, y), fb(lambda x: token_logprobs(x, w, y)), lambda x: token_logprobs(x, w, y)),
        "naive": (lambda: naive(h), fb(naive), naive),
    }
    if not h.is_cuda:  # Liger's and cut-cross-entropy's kernels are Triton's, for CUDA only
        return arms, hg
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        arms["liger"] = (lambda: liger(w, h, y), fb_loss(lambda x: liger(w, x, y)), None)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        from autoregembed.method.scorers import scorer_for

        for name, eps in (("cce", "auto"), ("cce_nofilter", None)):  # with and without gradient filtering
            arms[name] = (lambda eps=eps: linear_cross_entropy(h, w, y, reduction="sum", filter_eps=eps),
                          fb_loss(lambda x, eps=eps: linear_cross_entropy(x, w, y, reduction="sum", filter_eps=eps)),
                          None)
        cce = scorer_for("cce").token_logprobs  # per token, as scorer.kind=cce trains with it
        arms["cce_per_token"] = (lambda: cce(h, w, y), fb(lambda x: cce(x, w, y)), lambda x: cce(x, w, y))
    except ImportError:
        pass
    return arms, hg


def _arm_errors(torch, arms, hg, g, ref_lp, jac) -> dict:
    """Each arm's largest error against float64: log-probabilities (per-token arms) or the summed
    loss (summed arms), and the gradient w.r.t. the hidden states relative to its largest value."""
    errors = {}
    for name, (fwd, fwd_bwd, per_token) in arms.items():
        if fwd_bwd is None:
            continue
        with torch.no_grad():
            value = fwd()
        fwd_bwd()
        grad = hg.grad.double()
        ref_grad = g.double()[:, None] * jac if per_token else -jac  # d(sum -log p)/dh = -J
        err = {"grad_rel": ((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-30)).item()}
        if per_token:
            err["logprob_abs"] = (value.double() - ref_lp).abs().max().item()
        else:
            err["loss_rel"] = abs(value.double().item() + ref_lp.sum().item()) / max(abs(ref_lp.sum().item()), 1e-30)
        errors[name] = err
        hg.grad = None
    return errors


def time_kernels(torch, shapes, device, reps: int) -> list[dict]:
    """Side by side per shape and distribution (flat, peaked): milliseconds of the forward without
    gradient (what reference scoring runs) and of forward+backward, peak memory above the inputs
    (the previous call's gradient freed first), and every arm's error against float64."""
    out = []
    for v, m, d in shapes:
        for peaked in (False, True):
            h, w, y = _inputs(torch, v, m, d, torch.bfloat16 if device == "cuda" else torch.float32, device,
                              peaked=peaked)
            g = torch.randn(m, device=device) / m
            arms, hg = _arms(torch, h, w, y, g)
            ref_lp, jac = float64_reference(torch, h, w, y, torch.ones(m, device=device))
            row = {"V": v, "M": m, "D": d, "distribution": "peaked" if peaked else "flat",
                   "largest_probability_median": torch.softmax((h[:256] @ w.T).float(), -1).max(-1).values.median().item(),
                   "ms": {}, "peak_MB": {}, "errors": _arm_errors(torch, arms, hg, g, ref_lp, jac)}
            del jac, ref_lp
            dz = torch.randn(m, v, device=device, dtype=h.dtype)
            mm = time_ms(torch, lambda h=h, w=w: h @ w.T, reps)  # bound now: the loop deletes them later
            mm_back = time_ms(torch, lambda dz=dz, w=w: dz @ w, reps)
            del dz
            row["ms"]["matmul_2"] = mm + mm_back  # logits, dZ @ W: the floor of forward+backward
            for name, (fwd, fwd_bwd, _) in arms.items():
                with torch.no_grad():
                    row["ms"][name] = time_ms(torch, fwd, reps)
                    row["peak_MB"][name] = peak_bytes(torch, fwd) / 2**20
                if fwd_bwd is not None:
                    row["ms"][name + "_fb"] = time_ms(torch, fwd_bwd, reps)
                    hg.grad = None  # else the base would hold the last call's gradient, freed inside
                    row["peak_MB"][name + "_fb"] = peak_bytes(torch, fwd_bwd) / 2**20
            ms = row["ms"]
            row["ours_fwd_nograd_over_matmul"] = ms["ours"] / ms["matmul_1"]
            row["ours_fb_over_2_matmuls"] = ms["ours_fb"] / ms["matmul_2"]
            for other in ("liger", "cce", "cce_nofilter"):
                if other + "_fb" in ms:
                    row[f"ours_fb_over_{other}_fb"] = ms["ours_fb"] / ms[other + "_fb"]
                    row[f"ours_peak_over_{other}_peak"] = row["peak_MB"]["ours_fb"] / max(row["peak_MB"][other + "_fb"], 1e-9)
            out.append(row)
            print(f"  V={v} M={m} D={d} {row['distribution']} (median largest probability "
                  f"{row['largest_probability_median']:.3f}); forward = no gradient (reference scoring)")
            print("    " + "  ".join(f"{k} {t:.2f} ms" for k, t in ms.items()))
            print("    peak MB above the inputs " + "  ".join(f"{k} {x:.0f}" for k, x in row["peak_MB"].items()))
            print("    error vs float64 " + "  ".join(f"{k} " + ",".join(f"{e}={x:.1e}" for e, x in errs.items())
                                                      for k, errs in row["errors"].items()))
            print(f"    ours/matmul fwd (no grad) {row['ours_fwd_nograd_over_matmul']:.2f}, "
                  f"ours/2 matmuls fwd+bwd {row['ours_fb_over_2_matmuls']:.2f} (target <= 1.2)"
                  + "".join(f", ours/{o} fwd+bwd {row[f'ours_fb_over_{o}_fb']:.2f}, peak {row[f'ours_peak_over_{o}_peak']:.2f}"
                            for o in ("liger", "cce", "cce_nofilter") if f"ours_fb_over_{o}_fb" in row), flush=True)
            del h, w, y, g, hg, arms
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


