"""Ranked gene lists, as build-context computes them, on the genes query and reference share.

Both sides are ranked over the shared genes only (the `keep` mask of build-context's top-k
task), so a query measured on 20,000 genes and a reference on 30,000 compare like with like.
Chunks run in build-context's worker processes and come back in order, so results do not
depend on the number of workers. Lists are held as (lengths per cell, gene indices into the
shared vocabulary), the form `MarkerStats.score_ranked` takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

LADDER = (10, 25, 50, 100, 200, 300, 500, 1000)   # depths scored for a list of k genes


def depths_for(k: int) -> tuple[int, ...]:
    """The depths scored for lists of `k` genes: the ladder below k, then k itself."""
    return tuple(d for d in LADDER if d < k) + (k,)


@dataclass
class Vocabulary:
    """The genes query and reference share, sorted; index -1 means a gene outside it."""

    genes: np.ndarray

    def __post_init__(self) -> None:
        self.index = {str(g): i for i, g in enumerate(self.genes)}

    def columns(self, names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keep mask, vocabulary index per column) of a matrix whose columns are `names`;
        a name repeated in the matrix is kept at its first column only."""
        idx = np.asarray([self.index.get(str(n), -1) for n in names], dtype=np.int32)
        keep = idx >= 0
        _, first = np.unique(idx, return_index=True)
        unique = np.zeros(idx.size, dtype=bool)
        unique[first] = True
        return keep & unique, idx


@dataclass
class Ranked:
    """A chunk of ranked lists: `genes` are vocabulary indices (-1: outside it), best first."""

    lengths: np.ndarray
    genes: np.ndarray

    def rows(self) -> np.ndarray:
        """The list each entry belongs to."""
        return np.repeat(np.arange(self.lengths.size), self.lengths)

    def take(self, mask: np.ndarray) -> Ranked:
        """The lists of the cells where `mask` is true."""
        return Ranked(self.lengths[mask], self.genes[np.repeat(mask, self.lengths)])

    def ranks(self) -> np.ndarray:
        offsets = np.zeros(self.lengths.size + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return np.arange(self.genes.size) - np.repeat(offsets[:-1], self.lengths)


def matrix_chunks(jobs: list[tuple[Any, Any, np.ndarray, Any, np.ndarray, np.ndarray]], k: int,
                  pool: Any, depth: int) -> Iterator[tuple[Any, Ranked]]:
    """(tag, ranked lists) per job, in job order; a job is (tag, MatrixSpec, rows, in-memory
    CSR or None, keep mask, vocabulary index per column)."""
    from cellpuzzle_cli.build_context.build import ordered_results
    from cellpuzzle_cli.build_context.rows import refuse_nonfinite, topk_task

    def tasks():
        for tag, spec, rows, in_memory, keep, idx in jobs:
            yield ((tag, spec, rows, idx), in_memory is not None, topk_task,
                   (spec, rows, k, in_memory, keep))

    for (tag, spec, rows, idx), (lengths, genes, stats) in ordered_results(tasks(), pool, depth):
        refuse_nonfinite(spec, rows, stats)   # as build-context: a NaN is not "not expressed"
        yield tag, Ranked(lengths.astype(np.int64), idx[genes])


def table_chunks(path: Any, vocab: Vocabulary, k: int) -> Iterator[Ranked]:
    """The `top_genes` lists of a build-context table, first k genes, repeats dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    value_set = pa.array([str(g) for g in vocab.genes], type=pa.string())
    for batch in pq.ParquetFile(path).iter_batches(columns=["top_genes"], batch_size=65_536):
        top = batch.column("top_genes")
        lengths = pc.fill_null(pc.list_value_length(top), 0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(top)
        idx = pc.fill_null(pc.index_in(flat, value_set=value_set), -1)
        names = pc.fill_null(pc.index_in(flat, value_set=pc.unique(flat)), -1)
        yield _first_k(lengths.astype(np.int64), idx.to_numpy(zero_copy_only=False),
                       names.to_numpy(zero_copy_only=False), k)


def _first_k(lengths: np.ndarray, idx: np.ndarray, names: np.ndarray, k: int) -> Ranked:
    """Each list without repeated names (first kept), cut to k entries."""
    chunk = Ranked(lengths, idx.astype(np.int32))
    rows = chunk.rows()
    key = rows * (int(names.max(initial=0)) + 1) + names
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(idx.size, dtype=bool)
    keep[first] = True
    rows, genes = rows[keep], chunk.genes[keep]
    lengths = np.bincount(rows, minlength=lengths.size)
    chunk = Ranked(lengths, genes)
    top = chunk.ranks() < k
    return Ranked(np.bincount(chunk.rows()[top], minlength=lengths.size), genes[top])


def add_band_counts(out: np.ndarray, chunk: Ranked, types: np.ndarray,
                    depths: tuple[int, ...]) -> None:
    """Add to `out` (depths × types × genes) the cells listing each gene between depth b-1
    and depth b; `depth_counts` turns these into counts within each depth."""
    band = np.searchsorted(depths, chunk.ranks(), side="right")
    t = types[chunk.rows()]
    ok = (chunk.genes >= 0) & (t >= 0) & (band < len(depths))
    _, n_types, n_genes = out.shape
    keys = (band[ok] * n_types + t[ok].astype(np.int64)) * n_genes + chunk.genes[ok]
    np.add.at(out.reshape(-1), keys, np.ones(1, dtype=out.dtype))


def depth_counts(bands: np.ndarray, axis: int = 0) -> np.ndarray:
    """Band counts (see add_band_counts; depths along `axis`) as counts within each depth."""
    return np.cumsum(bands, axis=axis)
