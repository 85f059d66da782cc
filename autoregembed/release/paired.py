"""How sure a difference between two models on one evaluation is: a paired bootstrap over its items
(STS pairs, retrieval queries), both models' scores resampled with the same draw of items.

Why: the eval's verdict sets an export beside its base or its stage-1 start on a few hundred to a
thousand items, where a move of a few thousandths of nDCG@10 or a point of Spearman can be the items'
noise; the interval says whether a move (and a warning) would survive another sample of the same task.
Deterministic (a fixed seed), so a rerun prints the same interval.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

ROUNDS = 1000  # the intervals' ends move by ~1/10 of their width between bootstrap seeds at 1000 draws
LEVEL = 0.95


def _draws(n: int, rounds: int, seed: int) -> np.ndarray:
    if n < 2:
        raise ValueError(f"a paired bootstrap needs at least 2 items, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of ``x`` with the same row of ``y`` (average ranks for ties, as
    scipy.stats.spearmanr); 0 for a row where either side is constant."""
    rx, ry = (rankdata(v, axis=1) for v in (x, y))
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    return np.divide((rx * ry).sum(1), den, out=np.zeros(len(x)), where=den > 0)


def spearman_difference(gold, a, b, rounds: int = ROUNDS, seed: int = 0,
                        level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of Spearman(a, gold) - Spearman(b, gold), x100: ``a`` and ``b``
    are two models' cosines of the same pairs, in the same order as ``gold``."""
    gold, a, b = (np.asarray(v, dtype=np.float64) for v in (gold, a, b))
    if not len(gold) == len(a) == len(b):
        raise ValueError(f"paired scores must cover the same items: {len(gold)} gold, {len(a)} and {len(b)}")
    idx = _draws(len(gold), rounds, seed)
    g = gold[idx]
    return _interval(100 * (_spearman_rows(a[idx], g) - _spearman_rows(b[idx], g)), level)


def mean_difference(a, b, rounds: int = ROUNDS, seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """The ``level`` percentile interval of mean(a) - mean(b): per-item values of two models on the same
    items (e.g. each query's nDCG@10), in the same order."""
    a, b = (np.asarray(v, dtype=np.float64) for v in (a, b))
    if len(a) != len(b):
        raise ValueError(f"paired scores must cover the same items: {len(a)} and {len(b)}")
    return _interval((a - b)[_draws(len(a), rounds, seed)].mean(1), level)


def intervals(model: dict, floor: dict) -> dict[str, list[float]]:
    """{"sts" / "retrieval": the 95% interval of the model's figure minus the floor's, rounded to 4 digits}
    from two models' per-item scores as ``evaluate.sts_report`` / ``retrieval_report`` / ``base_report``
    give them (``items``), where both were measured on the same items."""
    out = {}
    if "sts" in model and "sts" in floor:
        out["sts"] = spearman_difference(model["gold"], model["sts"], floor["sts"])
    if "retrieval" in model and "retrieval" in floor:
        out["retrieval"] = mean_difference(model["retrieval"], floor["retrieval"])
    return {k: [round(x, 4) for x in v] for k, v in out.items()}


def keep(result: dict, prefix: str, model: dict, floor: dict) -> dict[str, list[float]]:
    """``intervals(model, floor)``, also written to ``result`` as ``<prefix>interval95`` when there are any:
    the one place an eval result (pipeline or ``autoregembed eval --base``) gains its intervals."""
    spans = intervals(model, floor)
    if spans:
        result[f"{prefix}interval95"] = spans
    return spans
