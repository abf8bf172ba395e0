"""build-context: per-cell top genes and an English context paragraph from `.h5ad` files.

Why it is built this way (the original scripts managed ~7 cells/s with the whole file in memory):

* The expression matrix is never loaded whole. Rows are read in chunks straight from the HDF5
  CSR arrays (or dense rows). Decompression dominates, so for gzip data the raw HDF5 chunks are
  inflated here with ISA-L (about 2x faster than the zlib inside HDF5; plain zlib when ISA-L is
  missing). Only the obs columns that are needed are read.
* Top-k is vectorised per chunk: rows are padded into a block, `np.partition` finds each row's
  k-th largest value, and only the few candidates at or above it are sorted.
* Chunks are computed by worker processes (reading disjoint row ranges) while this process writes
  Parquet row groups in order, so output bytes do not depend on the number of workers and peak
  memory does not grow with the number of cells.
* The context paragraph depends on donor/sample metadata only, so it is rendered once per
  distinct metadata combination, not per cell; wording comes from `configs/context_fields.yaml`.
* Nothing is read silently wrong: metadata goes through anndata's own element reader (every
  encoding, old and new); cell-type labels pass one policy (`label_policy`); what the matrix
  holds is probed and recorded (`values`); non-finite values, repeated cell ids and gene names
  are refused, and cells with no expressed gene are left out and counted. The checks on values
  ride on the chunked pass, so X is still read once.

The package keeps one concept per module: `settings` (the run's options), `fields` (context
fields and paragraphs), `h5ad` (metadata and matrix choice), `values` (what a matrix holds),
`labels` (labels from ontology IDs), `label_policy` (which labels an answer can name), `plan`
(what to read per file), `rows` (reading rows in workers), `topk` (the kernel), `table` (Parquet
writing), and `build` runs them. The names callers use are re-exported here, lazily: the CLI
imports the settings at start-up without paying for numpy and h5py.
"""

from __future__ import annotations

import importlib
from typing import Any

from cellpuzzle_cli.build_context.settings import ContextSettings

_EXPORTS = {
    "build": ("BuildResult", "build_context", "default_workers", "h5ad_inputs"),
    "fields": ("CORE_COLUMNS", "ContextFields", "DatasetRule", "Field", "load_context_fields"),
    "h5ad": ("MatrixSpec",),
    "values": ("MatrixValues", "probe_values"),
    "plan": ("FilePlan", "FileReport", "plan_file"),
    "rows": ("close_cached_files",),
    "topk": ("topk_csr", "topk_dense"),
}
_OWNER = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "CORE_COLUMNS",
    "BuildResult",
    "ContextFields",
    "ContextSettings",
    "DatasetRule",
    "Field",
    "FilePlan",
    "FileReport",
    "MatrixSpec",
    "MatrixValues",
    "build_context",
    "close_cached_files",
    "default_workers",
    "h5ad_inputs",
    "load_context_fields",
    "plan_file",
    "probe_values",
    "topk_csr",
    "topk_dense",
]


def __getattr__(name: str) -> Any:
    if name not in _OWNER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_OWNER[name]}"), name)
