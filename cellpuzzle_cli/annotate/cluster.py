"""Clusters of the query: the user's column, or scanpy's own pipeline, seeded, fine-grained.

The pipeline is the one CellTypist over-clusters with before majority voting: log1p of counts
per 10,000 (scanpy's normalize_total and log1p), highly variable genes, PCA, a neighbour graph
and Leiden at a resolution that grows with the number of cells (CellTypist's rule: 5 below
5,000 cells up to 30 from 200,000), so one cluster holds one type. PCA runs on the sparse
matrix (implicit centering) rather than a dense scaled copy, which keeps memory to the
matrix itself. A query larger than `max_cells_in_memory` (or than half the free memory) is
clustered on a seeded subsample; every other cell, streamed in chunks, joins the cluster
whose centroid is nearest in the subsample's PCA space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cellpuzzle_cli.annotate.query import QueryFile
from cellpuzzle_cli.annotate.settings import AnnotateSettings
from cellpuzzle_cli.io import Progress

_BYTES_PER_VALUE = 32          # float32 + int32 per non-zero, up to four copies at the peak
_BYTES_PER_CELL = 4096         # PCA, neighbour graph and bookkeeping per cell
_MIN_CLUSTER_CELLS = 10        # fewer cells: one cluster, no graph
_EXACT_KNN_CELLS = 8192        # scanpy searches neighbours exactly below this many cells


def _knn_matrix_class() -> type:
    from pynndescent import PyNNDescentTransformer

    class KnnMatrix(PyNNDescentTransformer):
        """pynndescent's transformer returning scipy's csr_matrix: scanpy 1.11 calls
        `getnnz` on the result, which the csr_array pynndescent 0.7 returns no longer has
        under scipy 1.17 (scanpy's default path fails there above 8,191 cells)."""

        def fit_transform(self, X: Any, y: Any = None, **kwargs: Any) -> Any:
            import scipy.sparse as sp

            return sp.csr_matrix(super().fit_transform(X, y, **kwargs))

    return KnnMatrix


def _knn_transformer(**kwargs: Any) -> Any:
    return _knn_matrix_class()(**kwargs)


@dataclass
class Clustering:
    """Every cell's cluster, and the neighbour graph where the pipeline ran here."""

    codes: np.ndarray                  # cluster index per cell (int32)
    names: list[str]
    given: bool                        # the user's column
    graph_rows: np.ndarray | None = None   # cells in the neighbour graph (ascending)
    distances: Any = None              # their kNN distances (scipy CSR), for smoothing
    pcs: np.ndarray | None = None      # their PCA coordinates (for the plot's UMAP)
    resolution: float | None = None
    note: str | None = None


def given_clusters(query: QueryFile) -> Clustering:
    """The user's clusters; categories without cells are left out."""
    codes, cats = query.clusters
    used, inverse = np.unique(codes, return_inverse=True)
    return Clustering(inverse.astype(np.int32), [str(cats[u]) for u in used], True)


def overclustering_resolution(n_cells: int) -> float:
    """CellTypist's over-clustering resolution for this many cells."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0),
                              (200_000, 25.0)):
        if n_cells < limit:
            return resolution
    return 30.0


def cluster_query(query: QueryFile, settings: AnnotateSettings,
                  progress: Progress | None = None) -> Clustering:
    """Cluster the query (a seeded subsample of it when it is too large for memory)."""
    import scipy.sparse as sp

    n = query.n_cells
    budget, why = in_memory_budget(query, settings.max_cells_in_memory)
    rng = np.random.default_rng([settings.seed, 3])
    rows = np.arange(n) if n <= budget else np.sort(rng.choice(n, budget, replace=False))
    if rows.size < _MIN_CLUSTER_CELLS:
        return Clustering(np.zeros(n, dtype=np.int32), ["0"], False,
                          note=f"{n} cells are too few to cluster: they form one cluster.")
    if progress:
        progress(0, total=rows.size, description="cluster")
    blocks = []
    for chunk in query.chunks(rows):
        blocks.append(query.normalised(chunk))
        if progress:
            progress(chunk.size)
    matrix = sp.vstack(blocks, format="csr")
    del blocks
    adata, genes = pca_space(matrix, settings)
    del matrix
    resolution = settings.resolution or overclustering_resolution(rows.size)
    leiden(adata, resolution, settings)
    labels = adata.obs["leiden"].astype(int).to_numpy()
    codes = np.zeros(n, dtype=np.int32)
    codes[rows] = labels
    note = None
    if rows.size < n:
        _join(query, rows, codes, adata, genes, progress)
        note = (f"{n:,} cells are more than {why}: {rows.size:,} cells (seeded) were "
                f"clustered and the other {n - rows.size:,} joined the cluster with the nearest "
                "centroid in PCA space.")
    names = [str(i) for i in range(int(labels.max()) + 1)]
    return Clustering(codes, names, False, rows, adata.obsp["distances"].tocsr(),
                      np.asarray(adata.obsm["X_pca"], dtype=np.float32), resolution, note)


def in_memory_budget(query: QueryFile, limit: int) -> tuple[int, str]:
    """How many cells can be clustered in memory: `limit`, or fewer if half the free memory
    cannot hold them (never an out-of-memory kill)."""
    nnz_per_cell = _nnz_per_cell(query)
    free = _available_bytes()
    if free is None:
        return limit, f"max_cells_in_memory ({limit:,})"
    fits = int(free // 2 // (nnz_per_cell * _BYTES_PER_VALUE + _BYTES_PER_CELL))
    if fits < limit:
        return max(_MIN_CLUSTER_CELLS, fits), (f"half the free memory holds ({fits:,}, below "
                                               f"max_cells_in_memory {limit:,})")
    return limit, f"max_cells_in_memory ({limit:,})"


def _nnz_per_cell(query: QueryFile) -> float:
    import h5py

    if query.spec.kind != "csr":
        return float(query.spec.shape[1])
    with h5py.File(query.spec.path, "r") as h5:
        nnz = int(h5[query.spec.key]["indptr"][-1])
    return max(1.0, nnz / max(1, query.n_cells))


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pca_space(matrix: Any, settings: AnnotateSettings) -> tuple[Any, np.ndarray]:
    """AnnData of the highly variable genes with PCA and the neighbour graph (scanpy, seeded);
    returns it and the columns it kept."""
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(matrix)
    n_cells, n_genes = matrix.shape
    del matrix                     # the caller drops its reference too: one copy at a time
    genes = np.arange(n_genes)
    if n_genes > settings.hvg_genes:
        sc.pp.highly_variable_genes(adata, n_top_genes=settings.hvg_genes)
        genes = np.flatnonzero(adata.var["highly_variable"].to_numpy())
        adata = adata[:, genes].copy()
    n_comps = max(1, min(settings.n_pcs, n_cells - 1, genes.size - 1))
    sc.pp.pca(adata, n_comps=n_comps, random_state=settings.seed)
    neighbors(adata, settings)
    return adata, genes


def neighbors(adata: Any, settings: AnnotateSettings, method: str = "gauss") -> None:
    """scanpy's neighbour graph on X_pca, with scanpy's own choice of search: exact below
    8,192 cells, else pynndescent with UMAP's parameters (see `_knn_matrix_class`).

    Clustering weighs the edges with scanpy's Gaussian kernel: UMAP's weights (`method="umap"`,
    used for the plot) cost a numba compilation of 5-10 s in every new process, a long wait
    for a 2,000-cell query, for clusters that serve the report and the join."""
    import scanpy as sc

    n_cells = adata.n_obs
    k = min(settings.n_neighbors, n_cells - 1)
    transformer = None
    if n_cells >= _EXACT_KNN_CELLS:
        transformer = _knn_transformer(n_neighbors=k, metric="euclidean",
                                       random_state=settings.seed,
                                       n_trees=min(64, 5 + round(n_cells ** 0.5 / 20.0)),
                                       n_iters=max(5, round(np.log2(n_cells))))
    sc.pp.neighbors(adata, n_neighbors=k, use_rep="X_pca", random_state=settings.seed,
                    transformer=transformer, method=method)


def leiden(adata: Any, resolution: float, settings: AnnotateSettings) -> None:
    import scanpy as sc

    sc.tl.leiden(adata, resolution=resolution, random_state=settings.seed, flavor="igraph",
                 n_iterations=2, directed=False)


def project(block: Any, adata: Any, genes: np.ndarray) -> np.ndarray:
    """Log-normalised rows in the PCA space of `adata` (its loadings and gene means)."""
    means = np.asarray(adata.X.mean(axis=0)).reshape(-1)
    loadings = adata.varm["PCs"]
    sub = block[:, genes]
    return np.asarray(sub @ loadings) - means @ loadings


def _join(query: QueryFile, rows: np.ndarray, codes: np.ndarray, adata: Any,
          genes: np.ndarray, progress: Progress | None) -> None:
    """Give every cell outside `rows` the cluster of the nearest centroid, chunk by chunk."""
    labels = codes[rows]
    pcs = adata.obsm["X_pca"]
    n_clusters = int(labels.max()) + 1
    centroids = np.stack([pcs[labels == c].mean(axis=0) for c in range(n_clusters)])
    squared = (centroids ** 2).sum(axis=1)
    others = np.setdiff1d(np.arange(query.n_cells), rows, assume_unique=True)
    if progress:
        progress(0, total=others.size, description="join")
    for chunk in query.chunks(others):
        points = project(query.normalised(chunk), adata, genes)
        # |p - c|^2 without the |p|^2 every centroid shares
        codes[chunk] = (squared[None, :] - 2 * points @ centroids.T).argmin(axis=1)
        if progress:
            progress(chunk.size)
