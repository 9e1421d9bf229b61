"""Percentile bootstrap intervals over resampled images or whole groups of images."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def bootstrap_ci(statistic, n: int, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 groups: Sequence[np.ndarray] | None = None) -> dict:
    """Percentile intervals of ``statistic(indices) -> {name: value}`` over resampled indices.

    ``groups``: the indices of each unit that is resampled whole (a patient's images, which are not
    independent of each other); None: each index is its own unit.
    Returns {name: [low, high]} ([None, None] when no resample gives a finite value) and, under
    ``"_valid"``, how many resamples gave a finite value per name.
    """
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, n, n)
        else:
            idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        for k, v in statistic(idx).items():
            values.setdefault(k, []).append(v)
    alpha = 100 * (1 - level) / 2
    out: dict[str, Any] = {"_valid": {}}
    for k, vs in values.items():
        a = np.asarray(vs, float)
        a = a[np.isfinite(a)]
        out["_valid"][k] = int(len(a))
        out[k] = [float(x) for x in np.percentile(a, [alpha, 100 - alpha])] if len(a) else [None, None]
    return out
