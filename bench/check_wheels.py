"""Do the wheels a GPU run carries install and resolve on the GPU image, which has no network?

    python bench/check_wheels.py [WHEELS_DIR] [IMAGE_LIST]    # defaults: .whl, bench/gpu_image.txt

Every wheel's tags must fit the image's CPython on manylinux x86_64, and every requirement of every
wheel (markers evaluated for that platform, no extras) must be met by a carried wheel or, where none
is carried, by the image's own package (``IMAGE_LIST``: ``name==version``, or a name alone where the
version was never read: reported as unverified, not failed).  Carried wheels shadow the image's
packages (bench/install_carried.sh puts them first on the path).  Exit 1 with one line per problem:
a wheel set that fails here would fail on the machine after minutes spent starting it.
"""
from __future__ import annotations

import os
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.tags import cpython_tags, compatible_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"]


def read_image(path: str) -> tuple[Version, dict]:
    """(the image's Python version, {package: version or None})."""
    packages = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            packages[canonicalize_name(name)] = Version(version) if version else None
    return packages.pop("python"), packages


def wheel_requirements(path: str) -> list[Requirement]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]


def check(wheels_dir: str, image_list: str) -> tuple[list[str], list[str]]:
    """(problems, unverified requirements)."""
    python, image = read_image(image_list)
    py = f"{python.major}{python.minor}"
    supported = set(cpython_tags((python.major, python.minor), platforms=PLATFORMS)) | \
        set(compatible_tags((python.major, python.minor), f"cp{py}", PLATFORMS))
    env = {"python_version": f"{python.major}.{python.minor}", "python_full_version": str(python),
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    carried, problems, unverified = {}, [], []
    files = sorted(f for f in os.listdir(wheels_dir) if f.endswith(".whl")) if os.path.isdir(wheels_dir) else []
    if not files:
        return [f"{wheels_dir}: no wheels (run bench/gpu_wheels.sh)"], []
    for f in files:
        name, version, _, tags = parse_wheel_filename(f)
        carried[name] = version
        if not tags & supported:
            problems.append(f"{f}: no tag installs on CPython {python} manylinux x86_64")
    for f in files:
        for req in wheel_requirements(os.path.join(wheels_dir, f)):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            have = carried.get(name, image.get(name, "missing"))
            source = "carried" if name in carried else "the image's"
            if have == "missing":
                problems.append(f"{f}: needs {req}, which is neither carried nor on the image")
            elif have is None:
                unverified.append(f"{f}: needs {req}; the image has {name}, version not read")
            elif not req.specifier.contains(have, prereleases=True):
                problems.append(f"{f}: needs {req}, but {source} {name} is {have}")
    return problems, unverified


def main(argv: list[str]) -> int:
    wheels_dir = argv[0] if argv else ".whl"
    image_list = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_image.txt")
    problems, unverified = check(wheels_dir, image_list)
    for line in unverified:
        print(f"[check_wheels] unverified: {line}")
    for line in problems:
        print(f"[check_wheels] {line}")
    n = len([f for f in os.listdir(wheels_dir) if f.endswith(".whl")]) if os.path.isdir(wheels_dir) else 0
    print(f"[check_wheels] {n} wheel(s) in {wheels_dir}: {len(problems)} problem(s), {len(unverified)} unverified")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
