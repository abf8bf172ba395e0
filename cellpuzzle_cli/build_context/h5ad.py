"""Reading `.h5ad` metadata without loading the file: obs/var columns, and which matrix to rank.

Only the obs columns that are needed are read, one at a time, straight from HDF5 (legacy
pre-0.7 files go through anndata in backed mode). Scaled data (negative values in X) is ranked
on `.raw.X` or a counts layer instead, because ranking z-scores says little about expression.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cellpuzzle_cli.errors import UserError

DEFAULT_GENE_COL = "feature_name"
PROBE_ROWS = 2000                   # rows inspected to decide whether X is scaled
_SUFFIX = re.compile(r"_ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


@dataclass(frozen=True)
class MatrixSpec:
    """Where the ranked matrix lives; picklable, so worker processes can open it themselves."""

    path: str
    key: str
    kind: str          # "csr" | "dense" | "csc"
    shape: tuple[int, int]
    label: str


Coded = tuple[np.ndarray, np.ndarray]   # (int32 codes, -1 = missing; object array of str)


def _coded(values: Any) -> Coded:
    """Any column as integer codes plus string categories."""
    import pandas as pd

    if isinstance(values, pd.Series):
        values = values.array
    if isinstance(values, pd.Categorical):
        cats = np.asarray([str(c) for c in values.categories], dtype=object)
        return values.codes.astype(np.int32), cats
    codes, uniques = pd.factorize(np.asarray(values), sort=False)
    cats = np.asarray([u.decode() if isinstance(u, bytes) else str(u) for u in uniques],
                      dtype=object)
    return codes.astype(np.int32), cats


class Frame:
    """The columns of an obs/var dataframe, read one at a time."""

    def __init__(self, columns: list[str], n: int, get: Callable[[str], Any],
                 index: Callable[[], np.ndarray]):
        self.columns, self.n, self._get, self._index = columns, n, get, index

    def column(self, name: str) -> Coded:
        return _coded(self._get(name))

    def index(self) -> np.ndarray:
        return np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in self._index()],
                          dtype=object)

    @classmethod
    def from_group(cls, group: h5py.Group) -> Frame:
        from anndata.io import read_elem

        index_key = group.attrs.get("_index", "_index")
        columns = [str(c) for c in group.attrs.get("column-order", [])]
        n = group[index_key].shape[0]
        return cls(columns, n, lambda c: read_elem(group[c]), lambda: read_elem(group[index_key]))

    @classmethod
    def from_pandas(cls, df: Any) -> Frame:
        return cls([str(c) for c in df.columns], len(df), lambda c: df[c],
                   lambda: df.index.to_numpy())


@dataclass
class _Opened:
    """An open file with its obs, var and matrices (legacy files go through anndata)."""

    h5: h5py.File
    obs: Frame
    var: Frame
    raw_var: Frame | None
    adata: Any = None

    def close(self) -> None:
        if self.adata is not None:
            self.adata.file.close()
        self.h5.close()


def open_h5ad(path: Path) -> _Opened:
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file, so it cannot be an .h5ad. Check that it "
                        "was downloaded completely and is an AnnData file (not a .loom or .rds).")
    try:
        h5 = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path} could not be opened as HDF5 ({exc}). The file is probably "
                        "truncated or damaged; download or write it again.") from exc
    try:
        if "obs" not in h5 or "var" not in h5:
            raise UserError(f"{path} is HDF5 but not an AnnData .h5ad (no obs/var). Write it "
                            "with anndata's `write_h5ad`.")
        if isinstance(h5["obs"], h5py.Group):
            raw_var = None
            if "raw" in h5 and "var" in h5["raw"]:
                raw_var = Frame.from_group(h5["raw"]["var"])
            return _Opened(h5, Frame.from_group(h5["obs"]), Frame.from_group(h5["var"]), raw_var)
        import warnings

        import anndata

        with warnings.catch_warnings():   # pre-0.7 layout: let anndata parse (and not nag)
            warnings.simplefilter("ignore")
            adata = anndata.read_h5ad(path, backed="r")
        raw_var = Frame.from_pandas(adata.raw.var) if adata.raw is not None else None
        return _Opened(h5, Frame.from_pandas(adata.obs), Frame.from_pandas(adata.var), raw_var,
                       adata)
    except UserError:
        h5.close()
        raise
    except (OSError, KeyError, ValueError) as exc:
        h5.close()
        raise UserError(f"{path} could not be read as .h5ad ({exc}). The file is probably "
                        "truncated or damaged; download or write it again.") from exc


def _matrix_at(h5: h5py.File, path: Path, key: str, label: str) -> MatrixSpec | None:
    if key not in h5:
        return None
    node = h5[key]
    if isinstance(node, h5py.Dataset):
        if node.ndim != 2:
            return None
        return MatrixSpec(str(path), key, "dense", tuple(int(x) for x in node.shape), label)
    fmt = str(node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", "")))
    shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
    kind = {"csr_matrix": "csr", "csr": "csr", "csc_matrix": "csc", "csc": "csc"}.get(fmt)
    if kind is None or shape is None:
        return None
    return MatrixSpec(str(path), key, kind, (int(shape[0]), int(shape[1])), label)


def _has_negative(h5: h5py.File, spec: MatrixSpec) -> bool:
    """Whether the first rows hold negative values (scaled data is negative almost everywhere)."""
    node = h5[spec.key]
    rows = min(PROBE_ROWS, spec.shape[0])
    if spec.kind == "dense":
        return bool((node[:rows] < 0).any())
    data = node["data"]
    if data.dtype.kind in "ub":
        return False
    end = int(node["indptr"][rows]) if spec.kind == "csr" else min(data.shape[0], rows * 1000)
    return bool((data[:end] < 0).any())


def choose_matrix(opened: _Opened, path: Path) -> tuple[MatrixSpec, Frame, list[str]]:
    """X, or .raw.X / a counts layer when X holds negative (scaled) values."""
    h5 = opened.h5
    x = _matrix_at(h5, path, "X", "X")
    notes: list[str] = []
    if x is not None and not _has_negative(h5, x):
        return x, opened.var, notes
    raw = _matrix_at(h5, path, "raw/X", "raw.X") or _matrix_at(h5, path, "raw.X", "raw.X")
    counts = _matrix_at(h5, path, "layers/counts", "layers['counts']")
    why = "X holds negative values (scaled data)" if x is not None else "the file has no X"
    for spec, var in ((raw, opened.raw_var), (counts, opened.var)):
        if spec is not None and var is not None and not _has_negative(h5, spec):
            notes.append(f"{why}; ranked genes on {spec.label} instead.")
            return spec, var, notes
    raise UserError(f"{path}: {why}, and there is no non-negative .raw.X or 'counts' layer to rank "
                    "genes on. Save the unscaled (counts or log-normalised) matrix in .raw or "
                    "layers['counts'] before scaling, and try again.")


def gene_names(var: Frame, gene_col: str | None, path: Path, where: str,
                warnings: list[str]) -> tuple[np.ndarray, str]:
    """Gene symbols with `_ENSG…` suffixes stripped; warns when only Ensembl IDs exist."""
    if gene_col is not None and gene_col not in var.columns:
        raise UserError(f"{path}: {where} has no column '{gene_col}'. Columns present: "
                        f"{', '.join(var.columns) or '(none)'}. Pass --gene-col with one of them, "
                        "or leave it out to use feature_name or the var names.")
    col = gene_col or (DEFAULT_GENE_COL if DEFAULT_GENE_COL in var.columns else None)
    if col is None:
        names, source = var.index(), f"{where} names"
    else:
        codes, cats = var.column(col)
        names = np.where(codes >= 0, cats[np.maximum(codes, 0)], "").astype(object)
        source = f"{where}.{col}"
    names = np.asarray([_SUFFIX.sub("", n) for n in names], dtype=object)
    ensembl = sum(1 for n in names if _ENSEMBL.match(n))
    if names.size and ensembl > names.size / 2:
        warnings.append(f"{ensembl} of {names.size} gene names in {source} are Ensembl IDs only; "
                        "top-gene lists will be IDs, which language models know poorly. Pass "
                        "--gene-col with a column of gene symbols if the file has one.")
    return names, source
