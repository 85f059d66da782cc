"""Peak memory of a piece of work, two ways, for the CPU benchmarks.

- ``peak_allocated_bytes(fn)``: the highest sum of live tensor allocations while ``fn`` runs, from
  the PyTorch profiler's allocation events (what the code asked for: independent of the machine's
  allocator, page cache and CPU kernels; the figure to compare across machines).
- ``peak_rss``: the process's resident-set high-water mark after a reset (what the OS saw: it
  includes allocator slack and BLAS workspaces, and is only meaningful where the kernel honours
  the reset; ``rss_peak_resets()`` says whether it does).
"""
from __future__ import annotations


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_rss_peak():
    """Make VmHWM (peak RSS) restart from the current RSS (Linux >= 4.0; sandboxes may ignore it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_resets() -> bool:
    """True when a reset really lowers VmHWM: touch 64 MiB, free it, reset, compare."""
    import numpy as np

    a = np.ones(64 << 20, dtype=np.uint8)
    del a
    before = status_kb("VmHWM")
    reset_rss_peak()
    return status_kb("VmHWM") < before - (32 << 10)


def peak_allocated_bytes(fn):
    """(fn's result, peak bytes of tensors allocated and still live at any moment during fn).

    Tensors that existed before the call are not counted; what fn frees before it returns is."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return out, peak
