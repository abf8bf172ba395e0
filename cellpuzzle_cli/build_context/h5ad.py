"""Reading `.h5ad` metadata without loading the file: obs/var columns, and which matrix to rank.

Every obs/var element is decoded by anndata's own element reader (`anndata.io.read_elem`), which
knows each registered encoding, old and new; only the expression matrix is read here directly,
in chunks (see `rows`). In the current layout (dataframe 0.2.0) only the needed columns are read,
one at a time. Older layouts (anndata 0.7's integer codes with their categories under
`__categories/`, written before per-column encodings existed) are read whole by anndata, as
anndata itself does; pre-0.7 files (obs as one structured array) go through anndata in backed
mode. Attributes written as bytes (fixed-length strings) are decoded, as anndata decodes them.
What anndata cannot read is refused, naming the element and its encoding.

Scaled data (negative values in X) is ranked on `.raw.X` or a counts layer instead, because
ranking z-scores says little about expression; what the ranked matrix holds is told by
`values.probe_values`.
"""

from __future__ import annotations

import re
import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cellpuzzle_cli.build_context.values import MatrixValues, probe_values
from cellpuzzle_cli.errors import UserError, existing_path

DEFAULT_GENE_COL = "feature_name"
_CURRENT_FRAME = ("dataframe", "0.2.0")    # read column by column
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


def text(value: Any) -> str:
    """An attribute or a label as text: bytes (fixed-length strings of old writers) decoded."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _texts(value: Any) -> list[str]:
    return [] if value is None else [text(v) for v in np.atleast_1d(value)]


def _coded(values: Any) -> Coded:
    """Any column as integer codes plus string categories."""
    import pandas as pd

    if isinstance(values, pd.Series):
        values = values.array
    if isinstance(values, pd.Categorical):
        cats = np.asarray([text(c) for c in values.categories], dtype=object)
        return values.codes.astype(np.int32), cats
    codes, uniques = pd.factorize(np.atleast_1d(np.asarray(values, dtype=object)), sort=False)
    cats = np.asarray([text(u) for u in uniques], dtype=object)
    return codes.astype(np.int32), cats


def _encoding(elem: Any) -> tuple[str, str]:
    attrs = elem.attrs
    return text(attrs.get("encoding-type", "")), text(attrs.get("encoding-version", ""))


def read_element(elem: Any, path: Path | str) -> Any:
    """One element through anndata's registry, or a UserError naming what anndata cannot read."""
    from importlib.metadata import version

    from anndata.io import read_elem

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")        # anndata's OldFormatWarning on old layouts
            return read_elem(elem)
    except MemoryError:
        raise
    except Exception as exc:   # whatever anndata's decoders raise: it cannot read this element
        kind, ver = _encoding(elem)
        raise UserError(f"{path}: anndata {version('anndata')} cannot read {elem.name} (encoding "
                        f"'{kind or 'none'}', version '{ver or 'none'}': {exc}). Convert it with "
                        "the tool that wrote the file, or choose columns that anndata reads "
                        "(build-context reads only the cell type, donor, batch, context-field "
                        "and gene-name columns).") from exc


class Frame:
    """The columns of an obs/var dataframe, read one at a time."""

    def __init__(self, columns: list[str], n: int, get: Callable[[str], Any],
                 index: Callable[[], Any]):
        self.columns, self.n, self._get, self._index = columns, n, get, index

    def column(self, name: str) -> Coded:
        return _coded(self._get(name))

    def index(self) -> np.ndarray:
        return np.asarray([text(x) for x in np.atleast_1d(np.asarray(self._index()))],
                          dtype=object)

    @classmethod
    def from_group(cls, group: h5py.Group, path: Path) -> Frame:
        index_key = text(group.attrs.get("_index", "_index"))
        columns = _texts(group.attrs.get("column-order"))
        n = group[index_key].shape[0]
        if _encoding(group) == _CURRENT_FRAME:
            return cls(columns, n, lambda c: read_element(group[c], path),
                       lambda: read_element(group[index_key], path))
        whole: list[Any] = []      # read on first use, once

        def frame() -> Any:
            if not whole:
                whole.append(_old_frame(group, path))
            return whole[0]

        return cls(columns, n, lambda c: frame()[c], lambda: frame().index.to_numpy())

    @classmethod
    def from_pandas(cls, df: Any) -> Frame:
        df = df.set_axis([text(c) for c in df.columns], axis=1)
        return cls(list(df.columns), len(df), lambda c: df[c], lambda: df.index.to_numpy())


def _old_frame(group: h5py.Group, path: Path) -> Any:
    """A dataframe in a layout before per-column encodings (anndata 0.7: integer codes, their
    categories under `__categories/<column>`), read whole by anndata, as anndata reads it.

    Codes whose categories sit under `__categories/` without the reference anndata 0.7 wrote
    to them are joined to those categories too, rather than read as numbers.
    """
    import pandas as pd

    df = read_element(group, path)
    if not isinstance(df, pd.DataFrame):
        kind, ver = _encoding(group)
        raise UserError(f"{path}: {group.name} is not a dataframe anndata can read (encoding "
                        f"'{kind or 'none'}', version '{ver or 'none'}'). Write the file again "
                        "with anndata's `write_h5ad`.")
    df = df.set_axis([text(c) for c in df.columns], axis=1)
    categories = group.get("__categories")
    for col in df.columns:
        if (isinstance(categories, h5py.Group) and col in categories
                and df[col].dtype.kind in "iu"):
            names = np.atleast_1d(read_element(categories[col], path))
            try:
                df[col] = pd.Categorical.from_codes(df[col].to_numpy(), names)
            except ValueError as exc:
                raise UserError(f"{path}: {group.name}/{col} holds codes outside its "
                                f"{names.size} categories ({exc}). The file is damaged; write "
                                "it again.") from exc
    return df


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
    existing_path(path, ".h5ad file")   # h5py says "not HDF5" of a file that is not there
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
                raw_var = Frame.from_group(h5["raw"]["var"], path)
            return _Opened(h5, Frame.from_group(h5["obs"], path),
                           Frame.from_group(h5["var"], path), raw_var)
        import anndata

        with _warnings.catch_warnings():   # pre-0.7 layout: let anndata parse (and not nag)
            _warnings.simplefilter("ignore")
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
    fmt = text(node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", "")))
    shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
    kind = {"csr_matrix": "csr", "csr": "csr", "csc_matrix": "csc", "csc": "csc"}.get(fmt)
    if kind is None or shape is None:
        return None
    return MatrixSpec(str(path), key, kind, (int(shape[0]), int(shape[1])), label)


def choose_matrix(opened: _Opened,
                  path: Path) -> tuple[MatrixSpec, Frame, MatrixValues, list[str]]:
    """X, or .raw.X / a counts layer when X holds negative (scaled) values; with what it holds."""
    h5 = opened.h5
    x = _matrix_at(h5, path, "X", "X")
    notes: list[str] = []
    if x is not None:
        values = probe_values(h5[x.key], x)
        if values.kind != "scaled":
            return x, opened.var, values, notes
    raw = _matrix_at(h5, path, "raw/X", "raw.X") or _matrix_at(h5, path, "raw.X", "raw.X")
    counts = _matrix_at(h5, path, "layers/counts", "layers['counts']")
    why = "X holds negative values (scaled data)" if x is not None else "the file has no X"
    for spec, var in ((raw, opened.raw_var), (counts, opened.var)):
        if spec is not None and var is not None:
            values = probe_values(h5[spec.key], spec)
            if values.kind != "scaled":
                notes.append(f"{why}; ranked genes on {spec.label} instead.")
                return spec, var, values, notes
    raise UserError(f"{path}: {why}, and there is no non-negative .raw.X or 'counts' layer to rank "
                    "genes on. Save the unscaled (counts or log-normalised) matrix in .raw or "
                    "layers['counts'] before scaling, and try again.")


def refuse_duplicates(values: np.ndarray, what: str, path: Path, fix: str) -> None:
    """A UserError with a count and an example when `values` repeat (ids must name one thing)."""
    import pandas as pd

    index = pd.Index(values)
    if index.is_unique:
        return
    repeated = index[index.duplicated(keep=False)].value_counts()
    example, times = repeated.index[0], int(repeated.iloc[0])
    raise UserError(f"{path}: {repeated.size} {what} occur more than once ({int(repeated.sum())} "
                    f"entries), e.g. {example!r} ({times} times). {fix}")


def gene_names(var: Frame, gene_col: str | None, path: Path, where: str,
               warnings: list[str], refuse_repeats: bool = True) -> tuple[np.ndarray, str]:
    """Gene symbols; `_ENSG…` suffixes stripped where the bare symbol stays unique.

    Repeated and empty (or missing) names are refused unless `refuse_repeats` is False (a
    top-gene list could not tell the genes apart, or would show a blank; a reader that makes
    names unique itself may pass False); a warning says when only Ensembl IDs exist.
    """
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
    others = [c for c in var.columns if c != col]
    blank = np.flatnonzero([not str(n).strip() for n in names])
    if refuse_repeats and blank.size:
        raise UserError(f"{path}: {blank.size} gene names in {source} are empty or missing, "
                        f"e.g. column {int(blank[0])} of the matrix (0-based), so top-gene lists "
                        "would show a blank for them. Pass --gene-col with a column that names "
                        "every gene" + (f" (columns present: {', '.join(others)})" if others
                                        else "") + ", or name them in the file.")
    if refuse_repeats:
        refuse_duplicates(names, f"gene names in {source}", path,
                          "Pass --gene-col with a column of unique names"
                          + (f" (columns present: {', '.join(others)})" if others else "")
                          + ", or make them unique first (anndata's `var_names_make_unique()`).")
    names = _strip_suffixes(names, source, warnings)
    ensembl = sum(1 for n in names if _ENSEMBL.match(n))
    if names.size and ensembl > names.size / 2:
        warnings.append(f"{ensembl} of {names.size} gene names in {source} are Ensembl IDs only; "
                        "top-gene lists will be IDs, which language models know poorly. Pass "
                        "--gene-col with a column of gene symbols if the file has one.")
    return names, source


def _strip_suffixes(names: np.ndarray, source: str, warnings: list[str]) -> np.ndarray:
    """`SYMBOL_ENSG…` → `SYMBOL`, except where another gene has that symbol too (CELLxGENE adds
    the suffix to tell such genes apart, so it stays on them)."""
    import pandas as pd

    stripped = np.asarray([_SUFFIX.sub("", n) for n in names], dtype=object)
    clash = pd.Index(stripped).duplicated(keep=False) & (stripped != names)
    if clash.any():
        warnings.append(f"{int(clash.sum())} gene names in {source} keep their _ENSG suffix "
                        "because another gene has the same symbol.")
        stripped[clash] = names[clash]
    return stripped
