"""Reading the query: an `.h5ad` as a lab holds it, streamed in row chunks.

The matrix and gene names are chosen exactly as build-context chooses them (X, or .raw.X / a
counts layer when X is scaled; symbols from `feature_name` or the var names), so a reference
built by build-context and a query meet on the same names. Rows are read in chunks through
build-context's row reader, so memory does not grow with the number of cells. No label column
is read: only the cluster column when the user names one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cellpuzzle_cli.build_context.h5ad import (
    Coded,
    MatrixSpec,
    choose_matrix,
    gene_names,
    open_h5ad,
)
from cellpuzzle_cli.build_context.plan import chunk_cells_for
from cellpuzzle_cli.build_context.values import MatrixValues
from cellpuzzle_cli.errors import UserError

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@dataclass
class QueryFile:
    """One query file: where its matrix is, what it holds, and its cells' clusters if given."""

    path: Path
    output: str                      # its path inside the output folder
    spec: MatrixSpec
    genes: np.ndarray                # one name per matrix column
    genes_from: str
    values: MatrixValues             # what the matrix holds (build-context's probe)
    n_cells: int
    chunk_cells: int
    clusters: Coded | None = None    # the user's cluster column
    has_umap: bool = False           # obsm['X_umap'] exists (used for the plot)
    in_memory: Any = None            # CSR copy of a matrix stored column-wise
    notes: list[str] = field(default_factory=list)
    truth: Coded | None = None       # known labels to compare with (--truth-col), never used

    def chunks(self, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """Row numbers in ascending chunks: all rows, or the given (sorted) ones."""
        rows = np.arange(self.n_cells) if rows is None else rows
        for a in range(0, rows.size, self.chunk_cells):
            yield rows[a:a + self.chunk_cells]

    def normalised(self, rows: np.ndarray) -> Any:
        """Rows (ascending) as log1p(counts per 10,000), whatever the matrix holds."""
        from cellpuzzle_cli.build_context.values import log1p_cp10k

        return log1p_cp10k(self.read(rows), self.values)

    def unexpressed(self) -> np.ndarray:
        """Per cell, whether no gene has a positive value (one pass over the matrix)."""
        empty = np.zeros(self.n_cells, dtype=bool)
        for rows in self.chunks():
            empty[rows] = (self.read(rows) > 0).getnnz(axis=1) == 0
        return empty

    def read(self, rows: np.ndarray) -> Any:
        """Rows (ascending) of the chosen matrix as scipy CSR, as stored."""
        from cellpuzzle_cli.build_context.rows import read_rows_csr

        return read_rows_csr(self.spec, rows, self.in_memory)


def naming(genes: np.ndarray) -> str:
    """How a file names its genes, for messages: Ensembl IDs or symbols."""
    ids = sum(1 for g in genes if _ENSEMBL.match(str(g)))
    return "Ensembl IDs" if genes.size and ids > genes.size / 2 else "gene symbols"


def _named(column: Coded) -> Coded:
    """A cluster column with blank names and spellings of a missing value ('', 'nan', 'NA')
    read as no value, as the label policy reads labels: such cells share no cluster."""
    from cellpuzzle_cli.annotate.evaluate import known_label

    codes, cats = column
    blank = np.asarray([known_label(str(c)) is None for c in cats] + [True])
    return np.where(blank[codes], -1, codes).astype(codes.dtype), cats


def open_query(path: Path, root: Path, cluster_col: str | None, gene_col: str | None,
               chunk_cells: int | None = None, truth_col: str | None = None) -> QueryFile:
    """The query's matrix, genes and (optional) clusters, read without loading the matrix."""
    opened = open_h5ad(path)
    try:
        notes: list[str] = []
        spec, var, values, choice = choose_matrix(opened, path)
        notes.extend(n.replace("ranked genes", "read expression") for n in choice)
        where = "raw.var" if spec.label == "raw.X" else "var"
        genes, genes_from = gene_names(var, gene_col, path, where, notes)
        n_cells = opened.obs.n
        if n_cells == 0:
            raise UserError(f"The query {path} holds no cells (obs is empty), so there is "
                            "nothing to annotate. Check that the right file was given.")
        if spec.shape != (n_cells, genes.size):
            raise UserError(f"{path}: {spec.label} has shape {spec.shape} but obs has {n_cells} "
                            f"rows and {where} {genes.size}. The file is inconsistent; write it "
                            "again with anndata.")
        clusters = None
        if cluster_col is not None:
            if cluster_col not in opened.obs.columns:
                raise UserError(f"{path}: obs has no column '{cluster_col}'. Columns present: "
                                f"{', '.join(opened.obs.columns) or '(none)'}. Pass --cluster-col "
                                "with the column of cluster names, or leave it out to cluster "
                                "the cells here.")
            clusters = _named(opened.obs.column(cluster_col))
            if (clusters[0] < 0).any():
                raise UserError(f"{path}: {int((clusters[0] < 0).sum())} cells have no value in "
                                f"'{cluster_col}' (missing, empty or 'nan'). Give every "
                                "cell a cluster, or leave --cluster-col out to cluster the "
                                "cells here.")
        in_memory = None
        if spec.kind == "csc":
            from anndata.io import read_elem

            notes.append(f"{spec.label} is stored column-wise (CSC), so it was loaded whole into "
                         "memory; save the file with a CSR matrix for large data.")
            in_memory = read_elem(opened.h5[spec.key]).tocsr()
        obsm = opened.h5.get("obsm")
        has_umap = isinstance(obsm, h5py.Group) and "X_umap" in obsm   # pre-0.7: a table
        truth = None
        if truth_col is not None:
            if truth_col not in opened.obs.columns:
                raise UserError(f"{path}: obs has no column '{truth_col}' to compare with "
                                f"(--truth-col). Columns present: "
                                f"{', '.join(opened.obs.columns) or '(none)'}.")
            truth = opened.obs.column(truth_col)
        rel = path.relative_to(root).as_posix()
        return QueryFile(path, rel, spec, genes, genes_from, values, n_cells,
                         chunk_cells or chunk_cells_for(opened.h5, spec), clusters, has_umap,
                         in_memory, notes, truth)
    finally:
        opened.close()
