"""The 2-D positions annotate.png draws: the file's own UMAP, or one computed here (seeded)."""

from __future__ import annotations

import numpy as np

from cellpuzzle_cli.annotate.cluster import Clustering, neighbors, pca_space
from cellpuzzle_cli.annotate.query import QueryFile
from cellpuzzle_cli.annotate.settings import AnnotateSettings

UMAP_EPOCHS = 200


def plot_positions(query: QueryFile, clustering: Clustering,
                   settings: AnnotateSettings) -> tuple[np.ndarray, np.ndarray, str]:
    """(cells drawn, their positions, what the axes are), at most `plot_cells` cells."""
    rng = np.random.default_rng([settings.seed, 5])
    if query.has_umap:
        rows = _subsample(np.arange(query.n_cells), settings.plot_cells, rng)
        xy = _stored_umap(query, rows)
        if xy is not None:
            return rows, xy, "UMAP (the file's X_umap)"
    if clustering.pcs is not None:
        pick = _subsample(np.arange(clustering.graph_rows.size), settings.plot_cells, rng)
        return clustering.graph_rows[pick], _umap(clustering.pcs[pick], settings), "UMAP"
    import scipy.sparse as sp

    rows = _subsample(np.arange(query.n_cells), settings.plot_cells, rng)
    block = sp.vstack([query.normalised(c) for c in query.chunks(rows)],
                      format="csr")
    if rows.size < 4:
        return rows, np.zeros((rows.size, 2)), "UMAP"
    adata, _ = pca_space(block, settings)
    return rows, _umap(adata.obsm["X_pca"], settings), "UMAP"


def _subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return rows if rows.size <= limit else np.sort(rng.choice(rows, limit, replace=False))


def _stored_umap(query: QueryFile, rows: np.ndarray) -> np.ndarray | None:
    import h5py

    with h5py.File(query.path, "r") as h5:
        node = h5["obsm"]["X_umap"]
        if not isinstance(node, h5py.Dataset) or node.ndim != 2 or node.shape[1] < 2:
            return None
        return np.asarray(node[rows, :2], dtype=np.float64)


def _umap(pcs: np.ndarray, settings: AnnotateSettings) -> np.ndarray:
    """UMAP (scanpy, seeded) of PCA coordinates, with 200 epochs (scanpy's own choice above
    10,000 cells): a picture, in half the time of the 500 it picks for a few thousand cells."""
    import anndata
    import scanpy as sc

    if pcs.shape[0] < 4:
        return np.zeros((pcs.shape[0], 2))
    adata = anndata.AnnData(np.zeros((pcs.shape[0], 0), dtype=np.float32))
    adata.obsm["X_pca"] = pcs
    neighbors(adata, settings, method="umap")
    sc.tl.umap(adata, random_state=settings.seed, maxiter=UMAP_EPOCHS)
    return np.asarray(adata.obsm["X_umap"], dtype=np.float64)
