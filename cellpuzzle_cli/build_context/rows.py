"""Reading expression rows in worker processes, and the task each worker runs on them.

Decompression dominates, so for gzip data the raw HDF5 chunks are inflated here with ISA-L
(about 2x faster than the zlib inside HDF5; plain zlib when ISA-L is missing). Wanted rows close
together are read as one run, so subsampled files do not pay one HDF5 call per cell.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from cellpuzzle_cli.build_context.h5ad import MatrixSpec
from cellpuzzle_cli.build_context.topk import topk_csr, topk_dense
from cellpuzzle_cli.errors import UserError

_MERGE_GAP_ROWS = 64                # read through gaps this small between wanted rows


def _inflater() -> Callable[[bytes, int], bytes]:
    try:
        from isal import isal_zlib

        return lambda raw, size: isal_zlib.decompress(raw, bufsize=size)
    except ImportError:  # ISA-L is an optional speed-up; zlib gives the same bytes
        return lambda raw, size: zlib.decompress(raw, bufsize=size)


class _ChunkReader:
    """Reads slices of a gzip-only chunked 1-D dataset by inflating raw chunks here."""

    def __init__(self, ds: h5py.Dataset):
        self.ds, self.cs, self.n = ds, ds.chunks[0], ds.shape[0]
        self.dtype = ds.dtype
        self.inflate = _inflater()
        self._last: tuple[int, np.ndarray] | None = None

    @staticmethod
    def usable(ds: h5py.Dataset) -> bool:
        if ds.ndim != 1 or ds.chunks is None or ds.dtype.byteorder not in "=<|":
            return False
        plist = ds.id.get_create_plist()
        return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_DEFLATE

    def chunk(self, i: int) -> np.ndarray:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        mask, raw = self.ds.id.read_direct_chunk((i * self.cs,))
        buf = raw if mask & 1 else self.inflate(raw, self.cs * self.dtype.itemsize)
        arr = np.frombuffer(buf, dtype=self.dtype)
        self._last = (i, arr)
        return arr

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.dtype)
        for i in range(start // self.cs, (stop - 1) // self.cs + 1):
            c0 = i * self.cs
            a, b = max(start, c0), min(stop, c0 + self.cs)
            out[a - start:b - start] = self.chunk(i)[a - c0:b - c0]
        return out


_FILES: dict[str, h5py.File] = {}
_READERS: dict[tuple[str, str], _ChunkReader | None] = {}


def _file(path: str) -> h5py.File:
    if path not in _FILES:
        _FILES[path] = h5py.File(path, "r")
    return _FILES[path]


def close_cached_files() -> None:
    """Close files this process opened for reading rows."""
    _READERS.clear()
    for f in _FILES.values():
        f.close()
    _FILES.clear()


def _read_1d(spec: MatrixSpec, name: str, start: int, stop: int) -> np.ndarray:
    ds = _file(spec.path)[spec.key][name]
    if stop <= start:
        return np.empty(0, dtype=ds.dtype)
    key = (spec.path, f"{spec.key}/{name}")
    if key not in _READERS:
        _READERS[key] = _ChunkReader(ds) if _ChunkReader.usable(ds) else None
    reader = _READERS[key]
    if reader is not None:
        try:
            return reader.read(start, stop)
        except (RuntimeError, OSError, zlib.error, ValueError):
            _READERS[key] = None    # unallocated chunks or odd storage: let HDF5 do it
    return ds[start:stop]


def _runs(local: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges covering `local` (sorted), reading through gaps of up to _MERGE_GAP_ROWS."""
    breaks = np.flatnonzero(np.diff(local) > _MERGE_GAP_ROWS) + 1
    starts = local[np.r_[0, breaks]]
    ends = local[np.r_[breaks - 1, local.size - 1]] + 1
    return list(zip(starts.tolist(), ends.tolist()))


def _read_csr_rows(spec: MatrixSpec, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = int(rows[0])
    ip = _read_1d(spec, "indptr", lo, int(rows[-1]) + 2).astype(np.int64)
    local = rows - lo
    runs = _runs(local)
    data = [_read_1d(spec, "data", int(ip[s]), int(ip[e])) for s, e in runs]
    genes = [_read_1d(spec, "indices", int(ip[s]), int(ip[e])) for s, e in runs]
    values = data[0] if len(runs) == 1 else np.concatenate(data)
    indices = genes[0] if len(runs) == 1 else np.concatenate(genes)
    lengths = np.diff(ip)
    covered = np.concatenate([np.arange(s, e) for s, e in runs])
    if covered.size != local.size:
        wanted = np.zeros(lengths.size, dtype=bool)
        wanted[local] = True
        mask = np.repeat(wanted[covered], lengths[covered])
        values, indices = values[mask], indices[mask]
    indptr = np.zeros(local.size + 1, dtype=np.int64)
    np.cumsum(lengths[local], out=indptr[1:])
    return indptr, indices, values


def _read_dense_rows(spec: MatrixSpec, rows: np.ndarray) -> np.ndarray:
    ds = _file(spec.path)[spec.key]
    lo = int(rows[0])
    blocks = [ds[lo + s:lo + e] for s, e in _runs(rows - lo)]
    block = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    if block.shape[0] != rows.size:
        covered = np.concatenate([np.arange(s, e) for s, e in _runs(rows - lo)])
        block = block[np.isin(covered, rows - lo)]
    return block


@dataclass(frozen=True)
class ChunkStats:
    """What a chunk's values held besides its ranking, counted on the values already read."""

    negatives: int = 0
    nonfinite: int = 0           # NaN or ±inf
    first_nonfinite: int = -1    # the chunk row holding the first of them


def _stats(values: np.ndarray, row_of: Callable[[int], int]) -> ChunkStats:
    """Negatives and non-finite values; `row_of` maps a flat position to its row."""
    negatives = int(np.count_nonzero(values < 0))
    if values.dtype.kind != "f" or np.isfinite(values.sum()):   # NaN and inf reach the sum
        return ChunkStats(negatives)
    bad = ~np.isfinite(values)
    if not bad.any():                                            # the sum overflowed, no more
        return ChunkStats(negatives)
    return ChunkStats(negatives, int(np.count_nonzero(bad)), row_of(int(np.argmax(bad))))


def topk_task(spec: MatrixSpec, rows: np.ndarray, k: int, in_memory: Any = None,
              keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, ChunkStats]:
    """Top-k gene indices for `rows` of a matrix: (lengths per row, genes, what was seen).

    `keep` (a boolean mask over the columns) ranks only those genes, e.g. the ones a
    reference shares with the file (annotate); what was seen covers every column.
    """
    try:
        if in_memory is not None:
            sub = in_memory[rows]
            indptr, indices, values = sub.indptr.astype(np.int64), sub.indices, sub.data
        elif spec.kind == "dense":
            block = _read_dense_rows(spec, rows)
            stats = _stats(block.reshape(-1), lambda i: i // max(1, block.shape[1]))
            if keep is not None:
                block = np.where(keep[None, :], block, 0)
            return (*topk_dense(block, k), stats)
        else:
            indptr, indices, values = _read_csr_rows(spec, rows)
    except (OSError, zlib.error) as exc:
        raise UserError(f"{spec.path}: reading {spec.label} failed ({exc}). The file is probably "
                        "truncated or damaged; download or write it again.") from exc
    stats = _stats(values, lambda i: int(np.searchsorted(indptr, i, side="right")) - 1)
    if keep is not None:
        indptr, indices, values = _kept_columns(indptr, indices, values, keep)
    return (*topk_csr(indptr, indices, values, k), stats)


def _kept_columns(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                  keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CSR block without the entries of columns outside `keep`."""
    hit = keep[indices]
    n_rows = indptr.size - 1
    row = np.repeat(np.arange(n_rows), np.diff(indptr))
    out = np.zeros(indptr.size, dtype=np.int64)
    np.cumsum(np.bincount(row[hit], minlength=n_rows), out=out[1:])
    return out, indices[hit], values[hit]


def read_rows_csr(spec: MatrixSpec, rows: np.ndarray, in_memory: Any = None) -> Any:
    """Rows (ascending, unique) of any stored matrix as scipy CSR: what other steps read cells
    with (annotate, predict's CellTypist reference), through the same fast paths as
    build-context (or from `in_memory`, a CSR copy of a matrix stored column-wise).

    Values come as float32 where scipy cannot hold the stored type (float16), and non-finite
    values are refused, as build-context refuses them: a NaN read as 0 would label a cell."""
    import scipy.sparse as sp

    shape = (rows.size, spec.shape[1])
    if rows.size == 0:
        return sp.csr_matrix(shape)
    if in_memory is not None:
        block = in_memory[rows]
    elif spec.kind == "dense":
        block = sp.csr_matrix(_scipy_values(_read_dense_rows(spec, rows)))
    elif spec.kind == "csr":
        indptr, indices, values = _read_csr_rows(spec, rows)
        block = sp.csr_matrix((_scipy_values(values), indices, indptr), shape=shape)
    else:
        from anndata.io import read_elem

        block = read_elem(_file(spec.path)[spec.key]).tocsr()[rows]
    stats = _stats(block.data, lambda i: int(np.searchsorted(block.indptr, i, side="right")) - 1)
    refuse_nonfinite(spec, rows, stats)
    return block


def _scipy_values(values: np.ndarray) -> np.ndarray:
    """Values in a type scipy.sparse holds (it has no float16)."""
    return values.astype(np.float32) if values.dtype == np.float16 else values


def refuse_nonfinite(spec: MatrixSpec, rows: np.ndarray, stats: ChunkStats) -> None:
    """A UserError naming the file, the matrix and a row, when a chunk held NaN or inf."""
    if not stats.nonfinite:
        return
    row = int(rows[stats.first_nonfinite])
    raise UserError(f"{spec.path}: {spec.label} holds non-finite values (NaN or infinite), "
                    f"{stats.nonfinite} in rows {int(rows[0])}-{int(rows[-1])}, the first in "
                    f"row {row} (0-based, as adata[{row}]); cells cannot be normalised or "
                    "ranked by them. Replace them in the file (with 0 where they mean no "
                    "expression) or recompute the matrix, and try again.")
