"""Chance: what a random one-to-one assignment scores, the floor every number is read against.

A puzzle of N cells and N candidates, answered by a uniformly random permutation, gets each
cell right with probability 1/N (so one cell per puzzle on average) and the whole puzzle with
probability 1/N!. Over a mixture of sizes, chance cell accuracy is Σ1 / ΣN (cells are pooled,
as `cell_accuracy` pools them) and chance exact match is the mean of 1/N! over puzzles.
"""

from __future__ import annotations

import math

import numpy as np


def chance(n: np.ndarray) -> dict[str, float]:
    """Chance cell accuracy and exact match for puzzles of sizes `n`."""
    n = np.asarray(n, dtype=np.int64)
    if n.size == 0:
        return {"chance_cell_accuracy": 0.0, "chance_exact_match": 0.0}
    cells = float(np.maximum(n, 1).sum())
    sizes, counts = np.unique(n, return_counts=True)
    per_size = np.array([1.0 / math.factorial(int(k)) if k > 0 else 0.0 for k in sizes])
    exact = float((per_size * counts).sum() / n.size)
    return {"chance_cell_accuracy": float(n.size) / cells, "chance_exact_match": exact}
