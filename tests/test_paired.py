"""The paired bootstrap behind the eval's intervals: its values against a loop over the same draws with
scipy, and what an interval says of identical, clearly better and indistinguishable models."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from autoregembed.release import paired


def _brute(gold, a, b, rounds, seed, stat):
    idx = np.random.default_rng(seed).integers(0, len(gold), size=(rounds, len(gold)))
    return np.quantile([stat(gold[i], a[i], b[i]) for i in idx], [0.025, 0.975])


def test_the_spearman_interval_is_the_percentiles_of_resampled_differences():
    rng = np.random.default_rng(3)
    gold = np.round(rng.uniform(0, 5, 60), 1)  # ties, as STS-B's gold scores have
    a, b = gold + rng.normal(0, 1.0, 60), gold + rng.normal(0, 2.0, 60)
    diff = lambda g, x, y: 100 * (spearmanr(x, g).statistic - spearmanr(y, g).statistic)  # noqa: E731
    np.testing.assert_allclose(paired.spearman_difference(gold, a, b, rounds=200, seed=5),
                               _brute(gold, a, b, 200, 5, diff), rtol=1e-9, atol=1e-9)


def test_the_mean_interval_is_the_percentiles_of_resampled_mean_differences():
    rng = np.random.default_rng(4)
    a, b = rng.uniform(0, 1, 40), rng.uniform(0, 1, 40)
    np.testing.assert_allclose(paired.mean_difference(a, b, rounds=300, seed=2),
                               _brute(a, a, b, 300, 2, lambda _, x, y: x.mean() - y.mean()), rtol=1e-12)


def test_what_an_interval_says():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 400)
    good, bad = gold + rng.normal(0, 0.5, 400), gold + rng.normal(0, 5.0, 400)
    assert paired.spearman_difference(gold, good, good) == (0.0, 0.0)  # the same model: no difference at all
    lo, hi = paired.spearman_difference(gold, good, bad)
    assert 0 < lo < 100 * (spearmanr(good, gold).statistic - spearmanr(bad, gold).statistic) < hi
    twin = gold + rng.normal(0, 5.0, 400)  # as good as `bad`, drawn apart: the interval reaches across 0
    lo, hi = paired.spearman_difference(gold, twin, bad)
    assert lo < 0 < hi
    spans = paired.intervals({"sts": good, "gold": gold, "retrieval": np.ones(5)},
                             {"sts": bad, "retrieval": np.zeros(5)})
    assert spans["retrieval"] == [1.0, 1.0] and spans["sts"][0] > 0 and set(spans) == {"sts", "retrieval"}
    assert paired.intervals({"sts": good, "gold": gold}, {"retrieval": np.zeros(5)}) == {}  # nothing measured alike


def test_unpaired_or_empty_scores_are_refused():
    with pytest.raises(ValueError, match="same items: 3 and 2"):
        paired.mean_difference([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 items"):
        paired.mean_difference([1.0], [0.0])


def test_keep_writes_the_intervals_under_the_floors_prefix_only_when_there_are_some():
    result = {}
    spans = paired.keep(result, "stage1_", {"retrieval": np.ones(4)}, {"retrieval": np.zeros(4)})
    assert result == {"stage1_interval95": {"retrieval": [1.0, 1.0]}} and spans == result["stage1_interval95"]
    assert paired.keep(result, "base_", {"retrieval": np.ones(4)}, {}) == {} and "base_interval95" not in result
