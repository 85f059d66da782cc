"""The lock of tested versions (``requirements.lock``): written from a tested environment, read by install.sh.

    python scripts/lockfile.py write LOCK            # this environment's packages -> LOCK
    python scripts/lockfile.py constraints LOCK      # LOCK as pip constraints for this environment
    python scripts/lockfile.py diff LOCK             # this environment against LOCK, one line a change

The lock pins every installed distribution (not only requirements.txt's) except pip and this project.
torch is pinned without its local label (``2.13.0``, not ``2.13.0+cpu``) so the pin means the same on
a CPU and a CUDA machine. ``constraints`` leaves out torch and everything torch requires when torch
was installed before (a user's CUDA build keeps its own triton and CUDA libraries: pinning them to
the CPU environment's versions would make pip replace torch).
"""
import argparse
import os
import importlib.metadata as md
import platform
import re
import sys

SKIP = {"pip", "autoregembed"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Normalised name -> version of every distribution this interpreter sees (first on the path wins)."""
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and norm(name) not in out:
            out[norm(name)] = dist.version
    return out


def read_lock(path: str) -> dict[str, str]:
    pins = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            if not m:
                sys.exit(f"lockfile: {path}:{lineno}: expected NAME==VERSION, got {line!r}")
            pins[norm(m.group(1))] = m.group(2)
    return pins


def requirement_closure(root: str) -> set[str]:
    """``root`` and every installed distribution it requires, transitively (markers ignored: a
    superset is what the caller wants to leave alone)."""
    seen, todo = set(), [norm(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in reqs:
            if "extra ==" in req:
                continue
            todo.append(norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)))
    return seen


def write(path: str) -> None:
    pins = {n: v for n, v in installed().items() if n not in SKIP}
    if "torch" in pins:
        pins["torch"] = pins["torch"].split("+", 1)[0]
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Exact versions that passed the unit tier and the default job; written by\n"
                "# scripts/refresh_lock.sh --write, installed by scripts/install.sh.\n"
                f"# Python {platform.python_version()}, {sys.platform} {platform.machine()}\n")
        for name in sorted(pins):
            f.write(f"{name}=={pins[name]}\n")


def constraints(path: str, keep_torch: bool) -> None:
    pins = read_lock(path)
    kept = requirement_closure("torch") if keep_torch else set()
    for name in sorted(pins):
        if name not in kept:
            print(f"{name}=={pins[name]}")


def diff(path: str) -> None:
    pins, have = (read_lock(path) if os.path.exists(path) else {}), installed()
    have = {n: v for n, v in have.items() if n not in SKIP}
    if "torch" in have:
        have["torch"] = have["torch"].split("+", 1)[0]
    lines = [f"  {n}: {pins.get(n, '-')} -> {have.get(n, '-')}" for n in sorted(set(pins) | set(have))
             if pins.get(n) != have.get(n)]
    print(f"[lock] {len(lines)} difference(s) against {path} (lock -> this environment)")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["write", "constraints", "diff"])
    ap.add_argument("lock")
    ap.add_argument("--keep-torch", action="store_true", help="with constraints: leave torch's closure out")
    args = ap.parse_args()
    if args.command == "write":
        write(args.lock)
    elif args.command == "constraints":
        constraints(args.lock, args.keep_torch)
    else:
        diff(args.lock)


if __name__ == "__main__":
    main()
