"""Installing: nothing in the checkout shadows an installed distribution; the lock; the script never
replaces an installed torch; the wheel's layout; the offline install a GPU machine runs."""
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import torch
from packaging.requirements import Requirement

from helpers import ROOT, child_env, run_child

LOCK = os.path.join(ROOT, "requirements.lock")


def importable_top_level_names(root: str) -> set[str]:
    """What ``import NAME`` finds in ``root`` ahead of site-packages: regular packages and modules
    (a folder without ``__init__.py`` is a namespace portion, which never shadows anything)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py") and os.path.isfile(path):
            names.add(entry[:-3])
    return names


def test_nothing_in_the_checkout_shadows_an_installed_distribution():
    owners = md.packages_distributions()
    ours = importable_top_level_names(ROOT)
    assert "autoregembed" in ours and "train" in ours
    clashes = {n: owners[n] for n in ours if n in owners and set(owners[n]) != {"autoregembed"}}
    assert not clashes, f"top-level names in the repository root shadow installed distributions: {clashes}"


def test_processes_started_in_the_root_import_the_installed_distributions():
    """``python -c`` in the root puts the root first on sys.path: transformers must still get Hugging
    Face's ``kernels`` (a transformers 5.2x dependency). (``python train.py`` from the root, the
    default job's first steps, runs in tests/test_golden.py.)"""
    code = ("import os, kernels, transformers.activations; "
            "print(os.path.dirname(os.path.dirname(kernels.__file__)))")
    proc = run_child(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        md.distribution("kernels")
    except md.PackageNotFoundError:
        pass  # an older transformers without it: nothing can shadow it, the import above still ran
    else:
        assert proc.stdout.strip() != ROOT, proc.stdout


def test_the_lock_pins_every_requirement_within_its_range():
    pins = {}
    with open(LOCK, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, version = line.split("==")
                pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        reqs = [Requirement(line.split("#", 1)[0].strip()) for line in f if line.split("#", 1)[0].strip()]
    assert reqs
    for req in reqs:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"requirements.lock has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"lock {name}=={pins[name]} outside {req}"
    assert "+" not in pins["torch"]  # the same pin on CPU and CUDA machines
    assert "pip" not in pins and "autoregembed" not in pins


def test_lock_constraints_leave_an_installed_torch_and_what_it_requires_alone():
    """With torch installed before (a CUDA build on a GPU node), pins on torch's requirements would
    make pip swap it: install.sh's constraints leave torch's whole requirement closure out."""
    def constraints(*extra):
        proc = run_child([os.path.join(ROOT, "scripts", "lockfile.py"), "constraints", LOCK, *extra], timeout=60)
        assert proc.returncode == 0, proc.stderr
        return {line.split("==")[0] for line in proc.stdout.split()}

    full, kept = constraints(), constraints("--keep-torch")
    closure = {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in md.requires("torch") if "extra" not in r}
    assert "torch" in full and "torch" not in kept
    assert not kept & closure and "transformers" in kept
    assert full - kept >= {"torch"} | (closure & full)


def test_install_keeps_the_installed_torch():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh"), "--dry-run"],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"keeping the installed torch {torch.__version__}" in proc.stdout
    assert "installing the tested versions from requirements.lock" in proc.stdout
    would = re.findall(r"Would install (.*)", proc.stdout)
    assert not any(re.search(r"\btorch-\d", line) for line in would), would


def test_wheel_installs_kernels_and_ds_configs_inside_the_package(tmp_path):
    """No top-level ``kernels`` (another distribution owns that name); the symlinked folders are
    copied into the wheel; the default DeepSpeed config ships with it, so ``autoregembed train``
    finds it outside the repository."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ beside the sources
    for part in ("autoregembed", "kernels", "ds_configs"):
        shutil.copytree(os.path.join(ROOT, part), src / part, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    assert os.path.islink(src / "autoregembed" / "kernels")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), src)
    proc = run_child(["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp_path])
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("autoregembed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "autoregembed/kernels/logit_rows.py" in names and "autoregembed/kernels/hopper_ptx.py" in names
    assert "autoregembed/ds_configs/zero3.json" in names
    assert not [n for n in names if n.startswith("kernels/") or n.startswith("ds_configs/")]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import autoregembed.kernels.logit_rows as k, autoregembed.tools.cli as c, os; "
            "assert k.__file__.startswith(os.environ['SITE']); "
            "assert c.DEFAULT_DS.startswith(os.environ['SITE']) and os.path.isfile(c.DEFAULT_DS)")
    env = {**child_env(), "PYTHONPATH": str(site), "SITE": str(site), "PYTHONSAFEPATH": "1"}
    proc = run_child(["-c", code], env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_machine_install_path_works_in_a_new_environment(tmp_path):
    """bench/install_carried.sh, as bench/gpu_check.sh runs it on a bare GPU machine: no network, no
    editable install, the image's packages as they are. Here a new venv that sees this environment's
    site-packages as a plain path (so not our editable install) stands in for the image."""
    venv, target, wheels = tmp_path / "venv", tmp_path / "site", tmp_path / "no-wheels"
    wheels.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (venv_site,) = venv.glob("lib/python*/site-packages")
    (venv_site / "image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = str(venv / "bin" / "python")
    env = {**child_env(), "PYTHON": py, "WHEELS": str(wheels), "PIP_NO_INDEX": "1"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "install_carried.sh"), str(target)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    code = ("import os, autoregembed, autoregembed.kernels.logit_rows as k, autoregembed.tools.cli as c; "
            "t = os.environ['TARGET']; "
            "assert autoregembed.__file__.startswith(t) and k.__file__.startswith(t), (autoregembed.__file__, k.__file__); "
            "assert c.DEFAULT_DS.startswith(t) and os.path.isfile(c.DEFAULT_DS)")
    proc = subprocess.run([py, "-c", code], env={**env, "PYTHONPATH": str(target), "TARGET": str(target)},
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (target / "kernels").exists()


@pytest.mark.parametrize("script", ["install.sh", "refresh_lock.sh"])
def test_scripts_refuse_unknown_arguments(script):
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), "--bogus"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
