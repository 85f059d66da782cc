"""Installing: the script never replaces an installed torch (on a GPU node, the user's CUDA build); the wheel's layout."""
import os
import re
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_install_keeps_the_installed_torch():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"keeping the installed torch {torch.__version__}" in proc.stdout
    would = re.findall(r"Would install (.*)", proc.stdout)
    assert not any(re.search(r"\btorch-\d", line) for line in would), would


def test_wheel_installs_kernels_and_ds_configs_inside_the_package(tmp_path):
    """No top-level ``kernels`` (another distribution owns that name); the default DeepSpeed config
    ships with the package, so ``autoregembed train`` finds it outside the repository."""
    import shutil
    import zipfile

    from conftest import run_child

    src = tmp_path / "src"  # a copy: setuptools writes build/ beside the sources
    for part in ("autoregembed", "kernels", "ds_configs"):
        shutil.copytree(os.path.join(ROOT, part), src / part, ignore=shutil.ignore_patterns("__pycache__"))
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
    code = ("import autoregembed.kernels, autoregembed.cli as c, os; "
            "assert autoregembed.kernels.__file__.startswith(os.environ['SITE']); "
            "assert c.DEFAULT_DS.startswith(os.environ['SITE']) and os.path.isfile(c.DEFAULT_DS)")
    env = {**os.environ, "PYTHONPATH": str(site), "SITE": str(site), "PYTHONSAFEPATH": "1"}
    proc = run_child(["-c", code], env=env, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
