"""From per-cell probabilities to labels and confidences, per cell or per cluster.

The confidence of a label is the probability of that type for the cell (averaged over its
nearest neighbours in `cell` mode), over *all* the reference's types plus "none of them",
not over the candidates alone. So when the right type is in the reference but not among the
candidates (or in no reference at all), the probability stays with it (or with "none"), the
best candidate's share stays low, and the cell is `unassigned` whenever a non-candidate
holds more than the best candidate. Below `min_confidence` a cell is `unassigned` too.

One-to-one: the clusters × candidates matrix of mean log-probabilities is solved with the
Hungarian algorithm (scipy's linear_sum_assignment), so each candidate goes to the cluster
that fits it best as a whole; clusters beyond the number of candidates then take their own
best candidate (predict's `assign`), because several clusters of one type are the rule
(over-clustering), and candidates beyond the number of clusters stay unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellpuzzle_cli.annotate.cluster import Clustering
from cellpuzzle_cli.annotate.evidence import cluster_sums

UNASSIGNED = "unassigned"
_TINY = 1e-9


@dataclass
class Decision:
    """Per cell: candidate index (-1: unassigned) and confidence; per cluster: its label."""

    labels: np.ndarray          # int32 per cell
    confidence: np.ndarray      # float32 per cell, 0..1
    cluster_labels: np.ndarray  # int32 per cluster (-1: unassigned)
    votes: np.ndarray           # clusters × (candidates + 1): cells whose own best is each
                                # candidate, last column: cells that fit no candidate


def smooth(prob: np.ndarray, clustering: Clustering, k: int) -> np.ndarray:
    """Each cell's probabilities averaged with its k nearest neighbours (where a graph is)."""
    import scipy.sparse as sp

    graph = clustering.distances
    if k == 0 or graph is None:
        return prob
    graph = graph.tocoo()
    order = np.lexsort((graph.col, graph.data, graph.row))
    row, col = graph.row[order], graph.col[order]
    starts = np.searchsorted(row, np.arange(graph.shape[0]))
    near = np.arange(row.size) - starts[row] < k
    m = graph.shape[0]
    weights = sp.csr_matrix((np.ones(int(near.sum()) + m),
                             (np.r_[row[near], np.arange(m)], np.r_[col[near], np.arange(m)])),
                            shape=(m, m))
    weights = sp.diags(1.0 / np.asarray(weights.sum(axis=1)).reshape(-1)) @ weights
    out = prob.copy()
    rows = clustering.graph_rows
    out[rows] = (weights @ prob[rows].astype(np.float64)).astype(np.float32)
    return out


def decide(prob: np.ndarray, candidates: np.ndarray, clustering: Clustering, by_cluster: bool,
           one_to_one: bool, min_confidence: float) -> Decision:
    """Labels (indices into `candidates`, which index prob's columns) and confidences."""
    n_clusters = len(clustering.names)
    codes = clustering.codes
    outside = np.setdiff1d(np.arange(prob.shape[1]), candidates)
    cand = prob[:, candidates]
    other = prob[:, outside].max(axis=1) if outside.size else np.zeros(prob.shape[0])
    own = cand.argmax(axis=1)
    own_fits = cand[np.arange(own.size), own] >= other
    votes = np.zeros((n_clusters, candidates.size + 1), dtype=np.int64)
    np.add.at(votes, (codes, np.where(own_fits, own, candidates.size)), 1)
    if by_cluster:
        cluster_labels = _cluster_choice(prob, candidates, outside, codes, n_clusters, one_to_one)
        labels = cluster_labels[codes]
        # an unassigned cluster's cells keep their own best candidate's (low) probability
        confidence = cand[np.arange(labels.size), np.where(labels >= 0, labels, own)]
    else:
        labels = np.where(own_fits, own, -1)
        confidence = cand[np.arange(own.size), own]
        cluster_labels = np.where(votes[:, :-1].max(axis=1) > 0, votes[:, :-1].argmax(axis=1), -1)
        cluster_labels = np.where(votes[:, :-1].max(axis=1) >= votes[:, -1], cluster_labels, -1)
    labels = np.where(confidence >= min_confidence, labels, -1).astype(np.int32)
    confidence = np.clip(confidence, 0.0, 1.0).astype(np.float32)
    return Decision(labels, confidence, cluster_labels.astype(np.int32), votes)


def _cluster_choice(prob: np.ndarray, candidates: np.ndarray, outside: np.ndarray,
                    codes: np.ndarray, n_clusters: int, one_to_one: bool) -> np.ndarray:
    """Each cluster's candidate by its mean probabilities; -1 where a non-candidate (another
    reference type, or none) holds more of the cluster than its chosen candidate."""
    from cellpuzzle_cli.baseline import assign

    sizes = np.maximum(np.bincount(codes, minlength=n_clusters), 1)[:, None]
    mean = cluster_sums(codes, n_clusters, prob.astype(np.float64)) / sizes
    cand = mean[:, candidates]
    if one_to_one:
        choice = np.asarray(assign(np.log(cand + _TINY)), dtype=np.int64)
    else:
        choice = cand.argmax(axis=1)
    chosen = cand[np.arange(n_clusters), choice]
    best_other = mean[:, outside].max(axis=1) if outside.size else np.zeros(n_clusters)
    return np.where(chosen >= best_other, choice, -1)
