"""Chance: what a random assignment scores, the floor every number is read against.

A puzzle of N cells and M candidates (M = N closed, M = N + K open set), answered by giving
the cells N distinct candidates uniformly at random, gets each cell right with probability 1/M
(N/M cells per puzzle on average) and the whole puzzle with probability (M − N)!/M!, one over
the number of such assignments; for a closed puzzle these are 1/N and 1/N!. Over a mixture of
puzzles, chance cell accuracy is Σ(N/M) / ΣN (cells are pooled, as `cell_accuracy` pools them)
and chance exact match is the mean of (M − N)!/M! over puzzles.
"""

from __future__ import annotations

import math

import numpy as np


def chance(n: np.ndarray, m: np.ndarray | None = None) -> dict[str, float]:
    """Chance cell accuracy and exact match for puzzles of `n` cells and `m` candidates
    (`m` left out: as many as cells)."""
    n = np.asarray(n, dtype=np.int64)
    m = n if m is None else np.maximum(np.asarray(m, dtype=np.int64), n)
    if n.size == 0:
        return {"chance_cell_accuracy": 0.0, "chance_exact_match": 0.0}
    cells = float(np.maximum(n, 1).sum())
    shapes, counts = np.unique(np.stack([n, m], axis=1), axis=0, return_counts=True)
    per_shape = np.array([1.0 / math.perm(int(b), int(a)) if a > 0 else 0.0 for a, b in shapes])
    exact = float((per_shape * counts).sum() / n.size)
    right = float((n / np.maximum(m, 1)).sum())
    return {"chance_cell_accuracy": right / cells, "chance_exact_match": exact}
