"""The first stage-1 and stage-2 losses of the built-in tiny default, pinned (to what CPUs' rounding
allows: ``RELATIVE``): on one rank and on two ZeRO-3 ranks.  A change that moves them changes what the
default job computes; if that is intended, say why in the commit and update the numbers (the failure
message prints the new ones)."""
import json
import os
import shutil

import pytest
from helpers import ROOT, run_child

pytestmark = pytest.mark.distributed

ONE_STEP = ["--set", "stage1.max_steps=1", "--set", "stage2.max_steps=1", "--set", "stage=pipeline"]
GOLDEN = {  # ranks -> (first stage-1 loss, first stage-2 loss); since the measured-best defaults (decoder BOS,
    # shared prefix, stage-1 contrast 4: the stage-1 loss includes the contrast term; c_p detached in stage 2)
    # and the default job's recipe (the tiny base pretrained 500 steps, stage 1 on 16 rows a step: since
    # --set stage1.max_steps=1 stopped resetting the section's other defaults, really 16, not 8); since the
    # tiny base has its own seed (model.tiny_seed=0), not the run's
    1: (6.434496879577637, 0.9679655432701111),
    2: (6.444971084594727, 1.1026689112186432),
}
# The recording machine's numbers; another CPU's kernels (AVX-512 against AVX2) round otherwise, and the
# default job's chain (500 pretraining steps, the prefix fit, stage 1, the reference scores) carries that
# into the first losses: measured 2026-12-06 on an AVX-512 machine, stage 1 within 1.7e-4 and stage 2
# within 5.6e-3 of these (relative), the same code that matched them on the recording machine.  The
# tolerances are a few times that: a code change that moves what the job computes moves them further.
RELATIVE = (1e-3, 2e-2)  # stage 1, stage 2
BUILT = {}  # the tiny base the 1-rank job built (rank 0 builds it alike, one thread): the 2-rank job starts in a
# folder that holds it, as a rerun of the default job does, instead of pretraining it again


def _first_losses(out: str) -> tuple[float, float]:
    def first(stage):
        with open(os.path.join(out, stage, "metrics.jsonl")) as f:
            return json.loads(f.readline())["loss"]

    return first("stage1"), first("stage2")


@pytest.mark.parametrize("ranks", [1, 2])
def test_first_losses_of_the_default_job(tmp_path, ranks):
    out = str(tmp_path / "run")
    if "base" in BUILT:
        shutil.copytree(BUILT["base"], os.path.join(out, "base"))
    r = run_child([os.path.join(ROOT, "train.py"), "--set", f"output_dir={out}", *ONE_STEP],
                  ranks=None if ranks == 1 else ranks, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    # other libraries' bars, notices and warnings used to be half the console; torch's C++ warnings ("[W..."),
    # e.g. a rendezvous socket retried under load, come and go with the machine's load and are not counted
    foreign = [line for line in (r.stdout + r.stderr).splitlines()
               if line.strip() and not line.startswith(("[autoregembed]", "[W"))]
    assert len(foreign) <= 3, foreign
    BUILT.setdefault("base", os.path.join(out, "base"))
    got = _first_losses(out)
    for loss, golden, rel in zip(got, GOLDEN[ranks], RELATIVE):
        assert loss == pytest.approx(golden, rel=rel), f"first losses on {ranks} rank(s): {got}"
