"""`--backend baseline`: marker likelihoods fitted on the reference, calibrated, per cell.

The model is predict's baseline (`MarkerStats`: per type, how often each gene sits among a
cell's top genes at several depths), fitted here from the reference's cells directly and
scored on each query cell's own ranked list. Differences from the puzzle baseline, each
measured on Kang 2018 (docs/benchmarks.md, "annotate"): lists are longer (200 genes, depths
10/25/50/100/200: expression deeper than the top 50 separates CD8 T from NK and CD4 T cells),
and the log-likelihoods are turned into probabilities with one temperature fitted on
reference cells of held-out donors, so a probability means what it says. The last column, the
background of all types, is the "none of them" a cell unlike every type falls into.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from cellpuzzle_cli.annotate.evidence import Evidence, fit_temperature, softmax
from cellpuzzle_cli.annotate.query import QueryFile
from cellpuzzle_cli.annotate.ranks import (
    Ranked,
    Vocabulary,
    add_band_counts,
    depth_counts,
    depths_for,
    matrix_chunks,
    table_chunks,
)
from cellpuzzle_cli.annotate.reference import Reference
from cellpuzzle_cli.annotate.settings import AnnotateSettings
from cellpuzzle_cli.io import Progress
from cellpuzzle_cli.markers import MarkerStats

CALIBRATION_CELLS = 20_000   # reference cells scored by the other fold's model to fit T
MARKER_DEPTH = 25            # a cluster's markers: genes among its cells' first 25
MARKERS_SHOWN = 5
MARKER_SHARE = 0.25          # ... listed by at least this share of the cluster's cells


class MarkerBackend:
    """Marker likelihoods over ranked genes; `evidence` gives calibrated probabilities."""

    name = "baseline"

    def __init__(self, reference: Reference, vocab: Vocabulary, settings: AnnotateSettings,
                 pool: Any, depth: int, notes: list[str], progress: Progress | None = None):
        k = settings.top_genes
        if reference.max_list is not None and k > reference.max_list:
            notes.append(f"The reference's cell tables list {reference.max_list} genes per cell, "
                         f"so the query's cells were ranked to {reference.max_list} genes too "
                         f"(top_genes={k}).")
            k = reference.max_list
        self.k, self.depths, self.vocab = k, depths_for(k), vocab
        self.types = list(reference.types)
        self.pool, self.depth = pool, depth
        counts, n_cells, sample = self._count(reference, settings.seed, progress)
        genes = [str(g) for g in vocab.genes]
        folds = [MarkerStats(self.types, genes, counts[f], n_cells[f], depths=self.depths)
                 for f in (0, 1)]
        self.log_prior = _log_prior(n_cells.sum(axis=0), settings.type_prior)
        self.temperature = _calibrate(folds, sample, self.log_prior)
        self.stats = MarkerStats(self.types, genes, counts.sum(axis=0), n_cells.sum(axis=0),
                                 depths=self.depths)
        self.model_label = (f"marker likelihoods over each cell's top {k} genes (depths "
                      f"{'/'.join(map(str, self.depths))}), temperature "
                      f"{self.temperature:.3g} fitted on held-out reference donors")

    def _count(self, reference: Reference, seed: int, progress: Progress | None
               ) -> tuple[np.ndarray, np.ndarray, list[tuple[Ranked, np.ndarray, np.ndarray]]]:
        """Counts per fold (2 × depths × types × genes), cells per fold and type, and the
        ranked lists of a seeded sample of reference cells for calibration."""
        n_types, n_genes = len(self.types), self.vocab.genes.size
        counts = np.zeros((2, len(self.depths), n_types, n_genes), dtype=np.int32)
        n_cells = np.zeros((2, n_types), dtype=np.int64)
        total = sum(f.types.size for f in reference.files)
        rng = np.random.default_rng([seed, 1])
        chosen = np.zeros(total, dtype=bool)
        chosen[rng.choice(total, min(total, CALIBRATION_CELLS), replace=False)] = True
        sample = []
        if progress:
            progress(0, total=total, description="reference")
        for start, chunk in self._reference_chunks(reference):
            ref_file, (a, b) = start
            types, folds = ref_file.types[a:b], ref_file.folds[a:b]
            for f in (0, 1):
                in_fold = np.where(folds == f, types, -1)
                add_band_counts(counts[f], chunk, in_fold, self.depths)
                n_cells[f] += np.bincount(in_fold[in_fold >= 0], minlength=n_types)
            pick = chosen[ref_file.offset + a:ref_file.offset + b] & (types >= 0)
            if pick.any():
                sample.append((chunk.take(pick), types[pick], folds[pick]))
            if progress:
                progress(b - a)
        return depth_counts(counts, axis=1), n_cells, sample

    def _reference_chunks(self, reference: Reference) -> Iterator[tuple[Any, Ranked]]:
        offset = 0
        for ref_file in reference.files:
            ref_file.offset = offset
            offset += ref_file.types.size
        if reference.kind == "cells":
            for ref_file in reference.files:
                a = 0
                for chunk in table_chunks(ref_file.path, self.vocab, self.k):
                    yield (ref_file, (a, a + chunk.lengths.size)), chunk
                    a += chunk.lengths.size
            return
        jobs = []
        for ref_file in reference.files:
            plan = ref_file.plan
            keep, idx = self.vocab.columns(plan.genes)
            for a, b in plan.chunks():
                jobs.append(((ref_file, (a, b)), plan.matrix, plan.kept[a:b], plan.in_memory,
                             keep, idx))
        yield from matrix_chunks(jobs, self.k, self.pool, self.depth)

    def evidence(self, query: QueryFile, clusters: np.ndarray, n_clusters: int, pool: Any,
                 progress: Progress | None) -> Evidence:
        """Each query cell's probabilities, and the genes its cluster's label rests on."""
        import scipy.sparse as sp

        keep, idx = self.vocab.columns(query.genes)
        jobs = [(rows, query.spec, rows, query.in_memory, keep, idx) for rows in query.chunks()]
        prob = np.empty((query.n_cells, len(self.types) + 1), dtype=np.float32)
        listed = sp.csr_matrix((n_clusters, self.vocab.genes.size), dtype=np.int64)
        empty = np.zeros(query.n_cells, dtype=bool)
        for rows, chunk in matrix_chunks(jobs, self.k, pool, self.depth):
            empty[rows] = chunk.lengths == 0
            scores = self.stats.score_ranked(chunk.lengths, chunk.genes)
            prob[rows] = softmax(scores / self.temperature + self.log_prior)
            top = (chunk.ranks() < MARKER_DEPTH) & (chunk.genes >= 0)
            owner = clusters[rows][chunk.rows()[top]]
            listed = listed + sp.csr_matrix(
                (np.ones(int(top.sum()), dtype=np.int64), (owner, chunk.genes[top])),
                shape=listed.shape)
            if progress:
                progress(rows.size)
        sizes = np.bincount(clusters, minlength=n_clusters)
        return Evidence(prob, self._markers(listed.tocsr(), sizes), empty=empty)

    def _markers(self, listed: Any, sizes: np.ndarray) -> Any:
        odds: dict[int, np.ndarray] = {}

        def markers(cluster: int, type_index: int) -> list[str]:
            """The type's most specific markers (listed by its cells more often than by cells
            overall) among the genes a quarter or more of the cluster's cells list in their
            first 25."""
            if type_index not in odds:
                odds[type_index] = self.stats.listing_gain(self.types[type_index], MARKER_DEPTH)
            row = listed.getrow(cluster)
            common = row.data >= MARKER_SHARE * max(1, sizes[cluster])
            genes = row.indices[common]
            score = odds[type_index][genes]
            order = np.lexsort((genes, -score))
            return [str(self.vocab.genes[genes[i]]) for i in order[:MARKERS_SHOWN]
                    if score[i] > 0]

        return markers


def _log_prior(n_cells: np.ndarray, kind: str) -> np.ndarray:
    """Log prior of each type and of "none" (as rare as the rarest type): the reference's
    shares, or uniform."""
    if kind == "uniform":
        return np.zeros(n_cells.size + 1)
    share = np.maximum(n_cells, 1) / max(1, n_cells.sum())
    return np.log(np.r_[share, share.min()])


def _calibrate(folds: list[MarkerStats], sample: list[tuple[Ranked, np.ndarray, np.ndarray]],
               log_prior: np.ndarray) -> float:
    """The temperature of the probabilities: each sampled cell scored by the other fold's model."""
    scores, truth = [], []
    for chunk, types, cell_folds in sample:
        for f in (0, 1):
            mine = cell_folds == f
            if mine.any():
                held_out = chunk.take(mine)
                scores.append(folds[1 - f].score_ranked(held_out.lengths, held_out.genes))
                truth.append(types[mine])
    if not scores:
        return 1.0
    return fit_temperature(np.concatenate(scores), np.concatenate(truth), log_prior)

