"""STS evaluation: the values it reports against direct computations."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from autoregembed.release.evaluate import mean_pairwise_cosine, sts_eval


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
