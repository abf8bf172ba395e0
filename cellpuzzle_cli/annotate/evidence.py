"""What every backend hands to the decision: per cell, a probability for each reference type.

A score backend (baseline, celltypist) fills `prob` from its own per-cell scores; a model
backend (hf/vllm, later) fills it from the votes its puzzles cast for each cluster, every
cell of a cluster sharing its cluster's vote shares. The last column is "none of the
reference's types", so a cell that fits nothing can say so. The decision module reads only
this, so one more backend is one more module with an `evidence` method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cellpuzzle_cli.annotate.query import QueryFile
from cellpuzzle_cli.io import Progress


@dataclass
class Evidence:
    """One query file's cells against the reference's types."""

    prob: np.ndarray   # (cells × types + 1) float32, rows sum to 1; last column: none
    markers: Callable[[int, int], list[str]]   # (cluster, type index) -> genes behind it
    reasons: dict[str, str] | None = None      # model backends: cluster -> a line of reasoning
    per_cluster: bool = False                  # every cell holds its cluster's probabilities
    empty: np.ndarray | None = None            # bool per cell: no expressed gene the backend knows


class Backend(Protocol):
    """A backend: the reference's types, what its model is, and evidence per query file."""

    name: str
    model_label: str  # what the model is, in words (recorded in uns["cellpuzzle"])
    types: list[str]  # the columns of Evidence.prob, before the final "none"

    def evidence(self, query: QueryFile, clusters: np.ndarray, n_clusters: int,
                 pool: Any, progress: Progress | None) -> Evidence:
        ...


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed stably in float64, returned as float32."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted.astype(np.float32)


def fit_temperature(scores: np.ndarray, truth: np.ndarray, offset: np.ndarray | float = 0.0
                    ) -> float:
    """The T for which softmax(scores / T + offset) best predicts `truth` (held-out log-loss).

    Naive Bayes sums evidence over hundreds of genes as if independent, so its raw
    posteriors are near 0 or 1 whatever the odds; one temperature, fitted on reference cells
    the model did not see, makes "probability 0.8" right about 80% of the time.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    rows = np.arange(truth.size)

    def loss(log_t: float) -> float:
        z = scores / np.exp(log_t) + offset
        return float(np.mean(logsumexp(z, axis=1) - z[rows, truth]))

    if truth.size == 0:
        return 1.0
    best = minimize_scalar(loss, bounds=(np.log(0.1), np.log(10_000.0)), method="bounded",
                           options={"xatol": 1e-3})
    return float(np.exp(best.x))


def cluster_sums(clusters: np.ndarray, n_clusters: int, values: np.ndarray) -> np.ndarray:
    """Per cluster, the sum of `values` (cells × k) over its cells."""
    columns = [np.bincount(clusters, weights=values[:, j], minlength=n_clusters)
               for j in range(values.shape[1])]
    return np.stack(columns, axis=1) if columns else np.zeros((n_clusters, 0))
