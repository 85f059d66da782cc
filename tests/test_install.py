"""The install script never replaces an installed torch (on a GPU node: the user's CUDA build)."""
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
