"""The cells contract: reading the Parquet cell tables build-context writes.

One row per cell (`cell_id, dataset, donor_id, batch_id, cell_type, top_genes, context`, plus
the cell type's ontology term ID when the data carries one). make-qa samples puzzles from them
and annotate fits its reference on them; both read them here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import find_files

REQUIRED_COLUMNS = ("cell_id", "dataset", "donor_id", "cell_type", "top_genes", "context")
META_COLUMNS = ("cell_id", "dataset", "donor_id", "batch_id", "cell_type", "context")
TERM_COLUMN = "cell_type_ontology_term_id"   # optional: build-context keeps it when present
_UNKNOWN_DONOR = "unknown"


@dataclass
class Cells:
    """Cell metadata as a DataFrame plus top genes kept in Arrow, row-aligned."""

    meta: Any  # pandas.DataFrame with META_COLUMNS as strings (batch_id may be None)
    genes: Any  # pyarrow.ChunkedArray of list<string>
    files: list[Path]

    def __post_init__(self) -> None:
        self.cell_ids = self.meta["cell_id"].to_numpy()
        self.types = self.meta["cell_type"].to_numpy()
        terms = self.meta[TERM_COLUMN]
        self.terms = terms.to_numpy() if terms.notna().any() else None


def find_cell_files(path: Path) -> list[Path]:
    """Parquet cell tables in a folder (recursively), or a single Parquet file."""
    path = existing_path(path, "cells input")
    if path.is_file() and path.suffix.lower() != ".parquet":
        raise UserError(f"{path} is not a Parquet file. Give the folder that `cellpuzzle "
                        "build-context` wrote (or one of its .parquet files).")
    files = [f for f, _ in find_files([path], (".parquet",), "cells input")]
    if not files:
        raise UserError(f"No cell files (.parquet) found in {path}. Point the command at the output "
                        "folder of `cellpuzzle build-context`, or run that step first.")
    return files


def _read_one(path: Path) -> tuple[Any, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path} could not be read as Parquet ({exc}). Re-run build-context "
                        "to regenerate it, or remove it from the folder.") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} that cellpuzzle needs; it "
                        f"has: {', '.join(names)}. Is it a build-context cell table?")
    wanted = [c for c in (*META_COLUMNS, TERM_COLUMN, "top_genes") if c in names]
    table = pq.read_table(path, columns=wanted)
    genes = table.column("top_genes").cast(pa.list_(pa.string()))
    meta = table.drop_columns(["top_genes"]).to_pandas()
    for optional in ("batch_id", TERM_COLUMN):
        if optional not in meta.columns:
            meta[optional] = None
    return meta, genes


def load_cells(files: list[Path]) -> Cells:
    """Only the columns puzzles need; rows with no cell type are dropped."""
    import pandas as pd
    import pyarrow as pa

    metas, chunks = [], []
    for f in files:
        meta, genes = _read_one(f)
        metas.append(meta)
        chunks.extend(genes.chunks)
    meta = pd.concat(metas, ignore_index=True)[[*META_COLUMNS, TERM_COLUMN]]
    genes = pa.chunked_array(chunks, type=pa.list_(pa.string()))
    keep = meta["cell_type"].notna().to_numpy()
    if not keep.all():
        meta = meta[keep].reset_index(drop=True)
        genes = genes.filter(pa.array(keep))
    for col in ("cell_id", "dataset", "cell_type", "context"):
        meta[col] = meta[col].fillna("").astype(str)
    meta["donor_id"] = meta["donor_id"].fillna(_UNKNOWN_DONOR).astype(str)
    batch = meta["batch_id"]
    meta["batch_id"] = batch.where(batch.isna(), batch.astype(str))
    return Cells(meta=meta, genes=genes, files=files)
