"""Reference scores round-trip by content, and mismatched scores are refused."""
import random

import pytest

from autoregembed.ground.data import row_key
from autoregembed.run.refscores import ReferenceScoreError, ReferenceScores, fingerprint, reusable, save_scores

ROWS = [{"query": f"q{i}", "pos": f"p{i}", "neg": [f"n{i}.{j}" for j in range(i % 3 + 1)], "instruction": "I"}
        for i in range(20)]


def test_round_trip_is_keyed_by_content_not_order(tmp_path):
    scores = [[-float(i)] + [-(i + 0.5 + j) for j in range(len(r["neg"]))] for i, r in enumerate(ROWS)]
    path = str(tmp_path / "s.safetensors")
    save_scores(path, [row_key(r) for r in ROWS], scores, "fp")
    refs = ReferenceScores(path, expected_fingerprint="fp")
    shuffled = list(zip(ROWS, scores))
    random.Random(0).shuffle(shuffled)
    for row, s in shuffled:
        c, rs = refs.lookup(row)
        assert [c] + rs == pytest.approx(s)


def test_refuses_other_fingerprint_changed_rows_and_missing_file(tmp_path):
    path = str(tmp_path / "s.safetensors")
    save_scores(path, [row_key(ROWS[0])], [[-1.0, -2.0]], "aaaa")
    with pytest.raises(ReferenceScoreError, match="different stage-1 model"):
        ReferenceScores(path, expected_fingerprint="bbbb")
    refs = ReferenceScores(path, expected_fingerprint="aaaa")
    with pytest.raises(ReferenceScoreError, match="no reference score"):
        refs.lookup({**ROWS[0], "pos": "edited"})
    with pytest.raises(ReferenceScoreError, match="run the 'reference' stage"):
        ReferenceScores(str(tmp_path / "none.safetensors"))


def test_fingerprint_follows_weights_and_settings(tmp_path, tiny_base):
    import glob
    import shutil

    from safetensors.torch import load_file, save_file

    a = fingerprint(tiny_base, tiny_base, 5, 64, 64)
    assert a == fingerprint(tiny_base, tiny_base, 5, 64, 64)
    assert a != fingerprint(tiny_base, tiny_base, 4, 64, 64)
    assert a != fingerprint(tiny_base, tiny_base, 5, 32, 64)
    assert a != fingerprint(tiny_base, tiny_base, 5, 64, 64, decoder_bos=True)
    copy = shutil.copytree(tiny_base, tmp_path / "copy")
    assert fingerprint(str(copy), tiny_base, 5, 64, 64) == a  # content, not paths or times
    (weights,) = glob.glob(str(copy / "*.safetensors"))
    tensors = load_file(weights)
    norm = next(k for k in tensors if k.endswith("norm.weight"))
    tensors[norm] = tensors[norm].clone()
    tensors[norm][3] += 1e-3  # one value of a small tensor
    save_file(tensors, weights, metadata={"format": "pt"})
    assert fingerprint(str(copy), tiny_base, 5, 64, 64) != a


def test_refuses_scores_of_another_format_version(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = str(tmp_path / "old.safetensors")
    save_file({"keys": torch.zeros(1, 16, dtype=torch.uint8), "offsets": torch.tensor([0, 1]),
               "scores": torch.zeros(1)}, path, metadata={"fingerprint": "fp", "format": "autoregembed-reference-v1"})
    with pytest.raises(ReferenceScoreError, match="format autoregembed-reference-v1, this version reads .*v2; recompute"):
        ReferenceScores(path, expected_fingerprint="fp")


def test_check_all_names_the_first_unscored_row_and_counts_them(tmp_path):
    path = str(tmp_path / "s.safetensors")
    save_scores(path, [row_key(r) for r in ROWS[:18]], [[-1.0] * (1 + len(r["neg"])) for r in ROWS[:18]], "fp")
    refs = ReferenceScores(path, expected_fingerprint="fp")
    refs.check_all(ROWS[:18], "data.jsonl")
    edited = ROWS[:5] + [{**ROWS[5], "pos": "edited"}] + ROWS[6:]
    with pytest.raises(ReferenceScoreError, match=r"data.jsonl: row 6 \(and 2 more of 20\): .*no reference score"):
        refs.check_all(edited, "data.jsonl")


def test_reusable_only_when_the_file_is_current_covers_every_row_and_reads(tmp_path):
    path = str(tmp_path / "s.safetensors")
    assert reusable(path, "fp", ROWS) == "no score file yet"
    save_scores(path, [row_key(r) for r in ROWS], [[-1.0] * (1 + len(r["neg"])) for r in ROWS], "fp")
    assert reusable(path, "fp", ROWS) is None
    assert reusable(path, "fp", ROWS[3:]) is None  # a subset is covered too
    assert "different stage-1 model" in reusable(path, "other", ROWS)
    assert "no reference score" in reusable(path, "fp", ROWS + [{**ROWS[0], "query": "new"}])
    with open(path, "r+b") as f:  # a copy cut short
        f.truncate(40)
    assert reusable(path, "fp", ROWS) not in (None, "")
