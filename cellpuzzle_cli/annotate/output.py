"""Writing the annotated query and clusters.tsv.

The annotated file is the query's own bytes plus new elements: the file is copied, then the
new obs columns and uns['cellpuzzle'] are written into the copy with anndata's element writer
through h5py. X, .raw, layers, var, obsm, cell order and every other obs column stay exactly
as they were (byte for byte), and memory stays flat however large the file. Only files in
anndata's pre-0.7 layout (obs stored as one table) are rewritten by anndata as a whole.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.io import atomic_write_bytes

LABEL, CONFIDENCE, CLUSTER = "cellpuzzle_label", "cellpuzzle_confidence", "cellpuzzle_cluster"
UNS_KEY = "cellpuzzle"
CLUSTER_COLUMNS = ("file", "cluster", "cells", "label", "confidence", "share", "runner_up",
                   "runner_up_share", "unassigned_cells", "markers", "reasoning")


def obs_columns(labels: Sequence[str], label_codes: np.ndarray, confidence: np.ndarray,
                cluster_names: Sequence[str], cluster_codes: np.ndarray) -> dict[str, Any]:
    """The three new obs columns: categorical label and cluster, float confidence."""
    import pandas as pd

    return {
        LABEL: pd.Categorical.from_codes(label_codes, categories=list(labels)),
        CONFIDENCE: np.asarray(confidence, dtype=np.float32),
        CLUSTER: pd.Categorical.from_codes(cluster_codes, categories=list(cluster_names)),
    }


def write_annotated(src: Path, dst: Path, columns: dict[str, Any], uns: dict[str, Any]) -> bool:
    """Copy `src` to `dst` and add the obs columns and uns entry; returns whether the file had
    to be rewritten whole (pre-0.7 layout)."""
    import h5py

    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(src, "r") as h5:
        legacy = not isinstance(h5.get("obs"), h5py.Group)
    if legacy:
        _rewrite(src, dst, columns, uns)
        return True
    shutil.copyfile(src, dst)
    from anndata.io import write_elem

    with h5py.File(dst, "r+") as h5:
        obs = h5["obs"]
        order = [str(c) for c in obs.attrs.get("column-order", [])]
        for name, values in columns.items():
            if name in obs:
                del obs[name]
            write_elem(obs, name, values)
            if name not in order:
                order.append(name)
        obs.attrs["column-order"] = np.asarray(order, dtype=object)
        if "uns" not in h5:
            write_elem(h5, "uns", {})
        if UNS_KEY in h5["uns"]:
            del h5["uns"][UNS_KEY]
        write_elem(h5["uns"], UNS_KEY, uns)
    return False


def _rewrite(src: Path, dst: Path, columns: dict[str, Any], uns: dict[str, Any]) -> None:
    import warnings

    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(src)
    for name, values in columns.items():
        adata.obs[name] = values
    adata.uns[UNS_KEY] = uns
    adata.write_h5ad(dst)


def clusters_tsv(rows: Sequence[dict[str, Any]]) -> bytes:
    """One line per cluster; numbers with 4 decimals so equal runs give equal bytes."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value))
        return str(value).replace("\t", " ").replace("\n", " ")

    lines = ["\t".join(CLUSTER_COLUMNS)]
    lines += ["\t".join(cell(row[c]) for c in CLUSTER_COLUMNS) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def write_clusters(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_bytes(path, clusters_tsv(rows))
