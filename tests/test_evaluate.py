"""STS evaluation: the values it reports against direct computations."""
import os

import numpy as np
import pytest
from scipy.stats import spearmanr

from autoregembed.release.evaluate import mean_pairwise_cosine, sts_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mean_pairwise_cosine_matches_all_pairs():
    emb = _unit(np.random.default_rng(0).normal(size=(37, 8)) + 0.5).astype(np.float32)
    sims = emb.astype(np.float64) @ emb.T.astype(np.float64)
    brute = (sims.sum() - np.trace(sims)) / (37 * 36)
    assert mean_pairwise_cosine(emb) == pytest.approx(brute, abs=1e-9)
    assert mean_pairwise_cosine(np.tile(emb[:1], (5, 1))) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_cosine(emb[:1])


class _TableEncoder:
    """Returns a fixed unit vector per sentence."""

    def __init__(self, table):
        self.table = table

    def encode(self, sentences, **kw):
        return np.stack([self.table[s] for s in sentences])


def test_sts_eval_scores_cosine_against_gold(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"s{i}" for i in range(12)]
    table = dict(zip(names, _unit(rng.normal(size=(12, 6)))))
    pairs = [(names[i], names[(i * 5 + 1) % 12]) for i in range(12)]
    gold = rng.uniform(0, 5, size=12)
    path = tmp_path / "sts.csv"
    path.write_text("".join(f"g\tf\ty\t{i}\t{g:.3f}\t{a}\t{b}\n" for i, ((a, b), g) in enumerate(zip(pairs, gold))))
    r = sts_eval(_TableEncoder(table), str(path), show_progress_bar=False)
    cos = [float(table[a] @ table[b]) for a, b in pairs]
    assert r["spearman"] == pytest.approx(spearmanr(cos, np.round(gold, 3)).statistic * 100)
    uniq = sorted({s for p in pairs for s in p})
    assert r["mean_cosine"] == pytest.approx(mean_pairwise_cosine(np.stack([table[s] for s in uniq])))


TEXTS = ["A man is playing a guitar.", "Two dogs run on the beach.", "the woman is walking her dog ."]
SAMPLE = os.path.join(ROOT, "autoregembed", "resources", "sts_dev_sample.csv")


def test_the_untrained_floor_is_the_base_read_as_its_export(tiny_base, tiny_export, pooled_export):
    """Encoder.untrained(base, meta) embeds as an export of the untrained base (its EMBED rows the
    vocabulary mean) with meta's instruction and pooling, and leaves the global RNG as it was."""
    import torch

    from autoregembed.release.encoder import Encoder
    from autoregembed.release.meta import ExportMeta

    rng = torch.get_rng_state()
    floor = Encoder.untrained(tiny_base, ExportMeta.read(pooled_export), device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)
    assert floor.pooled == [0, 1, 2, 3] and floor.instruction == "Retrieve semantically similar text."
    np.testing.assert_allclose(floor.encode(TEXTS), Encoder.from_pretrained(pooled_export, device="cpu").encode(TEXTS),
                               atol=1e-5)
    rows = floor.model.get_input_embeddings().weight.detach()
    np.testing.assert_allclose(rows[-5:].numpy(), rows[:-5].mean(0, keepdim=True).expand(5, -1).numpy(), atol=1e-4)
    every = Encoder.untrained(tiny_base, ExportMeta.read(pooled_export), device="cpu", pooling="all")
    np.testing.assert_allclose(every.encode(TEXTS), Encoder.from_pretrained(tiny_export, device="cpu").encode(TEXTS),
                               atol=1e-5)


def test_eval_base_scores_the_floor_beside_the_export(tiny_base, tiny_export, tmp_path, capsys):
    """`autoregembed eval --base`: an export of the untrained base scores its own floor; a missing
    base is refused before any model loads, and MTEB runs refuse it."""
    import json

    from autoregembed.tools.cli import main

    assert main(["eval", "--model", tiny_export, "--sts", SAMPLE, "--base", tiny_base]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["base_model"] == tiny_base and out["base_spearman_x100"] == pytest.approx(out["spearman_x100"], abs=0.02)
    lo, hi = out["base_interval95"]["sts"]  # the paired interval of export minus base, around their difference
    assert lo <= round(out["spearman_x100"] - out["base_spearman_x100"], 2) <= hi
    assert main(["eval", "--model", tiny_export, "--sts", SAMPLE, "--base", str(tmp_path / "gone")]) == 2
    assert "--base" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_export, "--mteb", "STSBenchmark", "--base", tiny_base]) == 2


def test_the_floor_is_computed_in_the_exports_dtype(tiny_base, tiny_export, tmp_path):
    """A base checkpoint stored in bf16 beside an fp32 export is scored in fp32, as the export is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autoregembed.release.encoder import Encoder
    from autoregembed.release.evaluate import base_report, sts_eval
    from autoregembed.release.meta import ExportMeta

    bf16 = str(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(bf16)
    fp32 = Encoder.untrained(bf16, ExportMeta.read(tiny_export), dtype=torch.float32)
    assert next(fp32.model.parameters()).dtype == torch.float32
    want = round(sts_eval(fp32, SAMPLE, show_progress_bar=False)["spearman"], 2)
    assert base_report(bf16, tiny_export, SAMPLE, show_progress_bar=False)["base_spearman_x100"] == want


def test_a_dead_model_is_refused_not_scored_nan(tiny_export, tmp_path):
    """An export whose embeddings are all zero (its final norm zeroed) scores NaN: ``why_dead`` names it,
    and ``autoregembed eval`` refuses with one line and exit 2 instead of printing a NaN score."""
    import shutil

    from safetensors.torch import load_file, save_file

    from autoregembed.release.encoder import Encoder
    from autoregembed.run.diagnostics import why_dead
    from helpers import run_child

    assert why_dead(Encoder.from_pretrained(tiny_export)) is None
    dead = tmp_path / "dead"
    shutil.copytree(tiny_export, dead)
    for shard in dead.glob("model-*.safetensors"):
        tensors = load_file(shard)
        save_file({n: t * 0 if n == "norm.weight" else t for n, t in tensors.items()}, shard, metadata={"format": "pt"})
    assert why_dead(Encoder.from_pretrained(str(dead))) == "8 of 8 probe texts embed as all-zero vectors"
    r = run_child(["-m", "autoregembed.tools.cli", "eval", "--model", dead, "--sts", SAMPLE])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"STS on {SAMPLE}: the model's score is not a number (its embeddings are the same for every text)" in r.stderr
    assert "NaN" not in r.stdout
