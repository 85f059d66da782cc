"""Whether a package change keeps the benchmark's results, so that a measurement series spanning sessions
need not freeze the package: bench/quality.py's arms ((a)-(e), (g), and (d) on mined negatives) on a short
protocol over the tiny base, once at an earlier commit and once at this checkout, side by side.  When every
measured value is identical (STS, the embeddings' mean cosine, nDCG@10 and recall@100 on the report
collections, the first and last losses, stage 1's information gap) and every model and score file the
arms wrote is the same byte for byte (the metrics are rounded, and training is chaotic: a last-bit
difference in a short run grows into a different model in a long one), the current package code is written
to bench/results/code_aliases.json as giving the same results as the earlier one: records and cached
stages keep pooling under the earlier code's digest (harness.package_code_file_hashes).

Why a short run proves something: the arms run every code path of the full protocol (stage 1, the
reference scores, stage 2 with and without in-batch negatives, InfoNCE, mining, retrieval and STS scoring)
and a CPU run is bit-exact for given inputs, so a change that moves any number moves these; one that
moves none (a refactor, a new option off by default, a fix elsewhere) keeps the records valid.  A change
that only the full protocol's sizes reach (e.g. texts longer than the short run's) is not caught: the
alias records the commands, and a doubt is settled by measuring again.

    python bench/code_alias.py --base efed2c8      # ~10 min on 2 cores; exit 1 and the differences if any
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile

from harness import CODE_ALIASES, ROOT, code_aliases, code_digest, commit, current_code_file_hashes

from autoregembed.ground.atomic import atomic_write_text

RUNS = {  # the short protocol: every arm's code path, a seed, the report split's STS half and collections
    "arms": ["--arms", "abcdeg"],
    "mined": ["--arms", "d", "--stage2-negatives", "mined"],
}
SHORT = ["--split", "report", "--seeds", "1", "--stage1-steps", "4", "--stage2-steps", "2", "--nli-rows", "16",
         "--ir-max-len", "32", "--fresh", "--stage1-cache", ""]
MEASURED = ("spearman_x100", "mean_pairwise_cosine", "retrieval", "loss_first_last", "info_gap")


def tree_file_hashes(tree: str) -> list[tuple[str, str]]:
    """``harness.package_code_file_hashes`` of the checkout at ``tree``: its files, or its own alias's."""
    out = subprocess.run([sys.executable, "-c", "import json, sys; sys.path.insert(0, 'bench'); import harness; "
                          "print(json.dumps(harness.package_code_file_hashes()))"],
                         cwd=tree, capture_output=True, text=True, check=True).stdout
    return [tuple(x) for x in json.loads(out)]


def measure(tree: str, base: str, work: str) -> dict[str, dict]:
    """{run: the measured fields of its record} of bench/quality.py in the checkout ``tree``."""
    out = {}
    os.makedirs(work, exist_ok=True)
    for name, arms in RUNS.items():
        results, scratch = os.path.join(work, name, "results"), os.path.join(work, name, "out")
        cmd = [sys.executable, os.path.join(tree, "bench", "quality.py"), *SHORT, *arms, "--base", base,
               "--results", results, "--out", scratch]
        log = os.path.join(work, f"{name}.log")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=tree, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            sys.exit(f"{' '.join(cmd)} failed (exit {rc}); its log: {log}")
        (record,) = glob.glob(os.path.join(results, "quality_runs", "*.json"))
        with open(record) as f:
            r = json.load(f)
        out[name] = {k: r.get(k) for k in MEASURED}
        files = sorted(glob.glob(os.path.join(scratch, "**", "*.safetensors"), recursive=True))
        out[name]["weights"] = {os.path.relpath(p, scratch): _sha256(p) for p in files}  # the metrics are rounded
    return out


def _sha256(path: str) -> str:
    """Of the file's tensors (names, dtypes, shapes, bytes), not its metadata (a reference file's
    fingerprint names the run's own paths)."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(path).items()):
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def differences(a: dict, b: dict, where: str = "") -> list[str]:
    """Every leaf where the two measurements differ, as 'path: a != b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{where}/{k}")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit whose package code the records were made with")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    current = current_code_file_hashes()
    if code_digest(current) in code_aliases():
        sys.exit(f"the package code {code_digest(current)} already has an alias in {CODE_ALIASES}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        tree = os.path.join(work, "base-tree")
        shared = os.path.join(ROOT, "..", "shared")
        if os.path.isdir(shared) and not os.path.exists(os.path.join(work, "shared")):
            os.symlink(os.path.abspath(shared), os.path.join(work, "shared"))  # the tree's ../shared: the data
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", tree, args.base],
                       check=True, capture_output=True)
        base_commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
        try:
            earlier = tree_file_hashes(tree)
            if code_digest(earlier) == code_digest(current):
                sys.exit(f"{args.base} and this checkout have the same package code {code_digest(current)}: "
                         "nothing to alias")
            from autoregembed.run.config import Config
            from autoregembed.run.loading import build_tiny_base

            cfg = Config()
            base = build_tiny_base(os.path.join(work, "tiny-base"), [cfg.data.stage1, cfg.data.stage2],
                                   hidden_size=32, layers=cfg.model.tiny_layers, seed=cfg.model.tiny_seed)
            was = measure(tree, base, os.path.join(work, "base"))
            now = measure(ROOT, base, os.path.join(work, "head"))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    diff = differences(was, now)
    if diff:
        print(f"the package code at {args.base} and here give different results; no alias:")
        print("\n".join(f"  {d}" for d in diff))
        sys.exit(1)
    aliases = list(code_aliases().values())
    aliases.append({"code": code_digest(current), "same_as": code_digest(earlier), "files": dict(earlier),
                    "base_commit": base_commit, "head_commit": commit(),
                    "date": datetime.date.today().isoformat(),
                    "command": "python bench/code_alias.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "protocol": {name: [*SHORT, *arms] for name, arms in RUNS.items()}, "measured": now})
    atomic_write_text(CODE_ALIASES, json.dumps({"aliases": aliases}, indent=1) + "\n")
    print(f"identical on every measured value: package code {code_digest(current)} gives the results of "
          f"{code_digest(earlier)} ({args.base}); alias written to {CODE_ALIASES}")


if __name__ == "__main__":
    main()
