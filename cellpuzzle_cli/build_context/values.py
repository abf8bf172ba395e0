"""What an expression matrix holds, told cheaply from its first rows: counts, log-normalised,
normalised (TPM/CPM-like) or scaled.

Ranking genes within a cell does not depend on which (each is monotone in expression per cell,
except scaled data, which build-context therefore does not rank), so build-context only records
it. A consumer that needs expression on one scale acts on it: CellTypist wants log1p of counts
per 10,000, which is reached from counts and normalised values directly and from log-normalised
values through expm1 first. Guessing per block instead (integers or not) turned a TPM matrix
into expm1 of thousands, i.e. infinities.

The rules, on the first `PROBE_ROWS` rows (non-finite values ignored; build-context refuses them):
negative values → scaled; only whole numbers → counts; rows that all sum to one total (1e6,
1e4, 1, …) → normalised; rows whose expm1 sums to one total → log-normalised (log1p of that
total per cell); values above `LOG_MAX` → normalised; anything else → log-normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PROBE_ROWS = 2000                   # rows inspected to decide what a matrix holds
VALUE_KINDS = ("counts", "log-normalised", "normalised", "scaled")
LOG_MAX = 30.0                      # log1p of 1e13: log-normalised values stay far below it
_SUM_TOLERANCE = 1e-3               # relative spread of row totals still called one total
_CSC_PROBE_VALUES = 2_000_000       # a CSC matrix has no cheap rows: its first values instead


@dataclass(frozen=True)
class MatrixValues:
    """What a matrix holds (`kind`, one of VALUE_KINDS) and, where every probed row sums to one
    total (of the values, or of their expm1 for log-normalised data), that total."""

    kind: str
    row_sum: float | None = None

    def describe(self) -> str:
        if self.row_sum is None:
            return self.kind
        whole = float(self.row_sum).is_integer() and abs(self.row_sum) < 1e15
        total = f"{int(self.row_sum):,}" if whole else f"{self.row_sum:g}"
        if self.kind == "log-normalised":
            return f"log-normalised (log1p of {total} per cell)"
        return f"normalised (rows sum to {total})"


def probe_values(node: Any, spec: Any) -> MatrixValues:
    """What the matrix at `node` (an h5py dataset or sparse group, described by `spec`, a
    `MatrixSpec`) holds, from its first rows."""
    rows = min(PROBE_ROWS, spec.shape[0])
    if spec.kind == "dense":
        block = np.asarray(node[:rows])
        return classify(block.reshape(-1), np.arange(rows + 1) * block.shape[1])
    data = node["data"]
    if data.dtype.kind == "b":
        return MatrixValues("counts")
    if spec.kind == "csr":
        starts = np.asarray(node["indptr"][:rows + 1], dtype=np.int64)
        return classify(data[int(starts[0]):int(starts[-1])], starts - starts[0])
    return classify(data[:min(data.shape[0], _CSC_PROBE_VALUES)], None)


def classify(values: np.ndarray, starts: np.ndarray | None) -> MatrixValues:
    """What `values` hold; `starts` (CSR-style row offsets into them) lets rows be summed."""
    if values.dtype.kind == "b":
        return MatrixValues("counts")
    finite = values
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
    if finite.size and finite.min() < 0:
        return MatrixValues("scaled")
    if values.dtype.kind in "iu" or np.array_equal(finite, np.rint(finite)):
        return MatrixValues("counts")
    if starts is not None:
        clean = np.where(np.isfinite(values), values, 0.0) if finite is not values else values
        clean = clean.astype(np.float64)
        total = _one_total(clean, starts)
        if total is not None:
            return MatrixValues("normalised", total)
        total = _one_total(np.expm1(clean), starts)
        if total is not None:
            return MatrixValues("log-normalised", total)
    if finite.max() > LOG_MAX:
        return MatrixValues("normalised")
    return MatrixValues("log-normalised")


def _one_total(values: np.ndarray, starts: np.ndarray) -> float | None:
    """The one total every non-empty row sums to (4 significant digits), else None."""
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    sums = cumulative[starts[1:]] - cumulative[starts[:-1]]
    sums = sums[sums > 0]
    if sums.size < 2 or sums.max() - sums.min() > _SUM_TOLERANCE * sums.max():
        return None
    return float(f"{np.median(sums):.4g}")


TARGET_SUM = 1e4   # log1p(counts per 10,000): scanpy's default scale, and CellTypist's


def log1p_cp10k(block: Any, values: MatrixValues) -> Any:
    """Rows as log1p(counts per 10,000), float32 CSR, with scanpy's own functions, from what the
    matrix holds (`values`, as `probe_values` tells it for the whole file): counts and
    normalised (TPM/CPM-like) values are proportional to counts already; log-normalised values
    are undone with expm1 first; scaled values cannot be brought back and are refused. Per-row
    operations only, so any chunking gives the same values."""
    import anndata
    import scanpy as sc
    import scipy.sparse as sp

    from cellpuzzle_cli.errors import UserError

    if values.kind == "scaled":
        raise UserError("This needs unscaled expression, and the matrix holds scaled values "
                        "(negative numbers). Keep counts or log-normalised values in X, .raw.X "
                        "or layers['counts'] of the .h5ad file.")
    block = sp.csr_matrix(block, dtype=np.float32, copy=True)
    block.data = np.maximum(np.nan_to_num(block.data), 0)
    if values.kind == "log-normalised":
        block.data = np.expm1(block.data)
    adata = anndata.AnnData(block)
    sc.pp.normalize_total(adata, target_sum=TARGET_SUM)
    sc.pp.log1p(adata)
    return sp.csr_matrix(adata.X, dtype=np.float32)
