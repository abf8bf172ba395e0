"""The reference: labelled cells to learn from, as `.h5ad` files or a build-context folder.

A labelled `.h5ad` (file or folder) is planned by build-context's own `plan_file`, so its
label column, ontology-ID resolution, gene names, matrix choice and the cells it keeps (whole
cells with a type) are exactly build-context's. A build-context output folder is read from
its Parquet cell tables (`top_genes`, `cell_type`, `donor_id`). Only metadata is read here;
rows are streamed later (reference_rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.annotate.query import naming
from cellpuzzle_cli.annotate.settings import AnnotateSettings
from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import find_files
from cellpuzzle_cli.markers import type_key


@dataclass
class RefFile:
    """One reference file: its cells' types and folds as global indices."""

    path: Path
    types: np.ndarray                # global type index per kept cell
    folds: np.ndarray                # calibration fold (0/1) per kept cell
    plan: Any = None                 # context.plan.FilePlan for an .h5ad
    genes: np.ndarray | None = None  # matrix columns' names (.h5ad)
    offset: int = 0                  # index of its first cell among all reference cells


@dataclass
class Reference:
    """The reference's types, genes and files; rows are read later, in chunks."""

    kind: str                        # "h5ad" | "cells" (a build-context folder)
    path: Path
    files: list[RefFile]
    types: list[str]
    type_cells: np.ndarray
    genes: np.ndarray                # every gene name the reference has (sorted, unique)
    genes_from: str
    max_list: int | None = None      # cells: the longest top_genes list
    notes: list[str] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        return int(self.type_cells.sum())

    def describe(self) -> str:
        return (f"{self.path} ({self.n_cells:,} cells, {len(self.types)} types, "
                f"{self.genes.size:,} genes)")


def open_reference(path: Path, settings: AnnotateSettings) -> Reference:
    """The reference's metadata; refuses one with fewer than two types."""
    path = existing_path(path, "reference")
    kind = reference_kind(path)
    ref = _cells_reference(path) if kind == "cells" else _h5ad_reference(path, settings)
    if len(ref.types) < 2:
        only = ref.types[0] if ref.types else "(none)"
        col = "cell_type" if kind == "cells" else settings.cell_type_col
        raise UserError(f"The reference {path} has {len(ref.types)} cell type in '{col}' "
                        f"({only}), so there is nothing to choose between. Give a reference "
                        "with at least two labelled types, or pass --cell-type-col with the "
                        "column that holds the labels.")
    return ref


def reference_kind(path: Path) -> str:
    """'h5ad' for labelled .h5ad files, 'cells' for a build-context folder (Parquet)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".h5ad", ".parquet"):
            return "h5ad" if suffix == ".h5ad" else "cells"
        raise UserError(f"The reference {path} is neither an .h5ad nor a Parquet cell table. "
                        "Give a labelled .h5ad (file or folder) or a build-context output folder.")
    h5ad = find_files([path], (".h5ad",), "reference")
    parquet = find_files([path], (".parquet",), "reference")
    if h5ad and parquet:
        raise UserError(f"The reference folder {path} holds both .h5ad files and Parquet tables. "
                        "Point --reference at the .h5ad files or at the build-context output "
                        "folder alone.")
    if not h5ad and not parquet:
        raise UserError(f"The reference folder {path} holds no .h5ad file and no Parquet cell "
                        "table. Give a labelled .h5ad (file or folder) or a build-context "
                        "output folder.")
    return "h5ad" if h5ad else "cells"


class _Types:
    """Global type indices, matched case-insensitively; the first spelling is kept."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def codes(self, codes: np.ndarray, cats: np.ndarray) -> np.ndarray:
        """Per-file codes (-1: no type) as global indices (-1 stays)."""
        lookup = np.empty(len(cats) + 1, dtype=np.int32)
        lookup[-1] = -1
        for i, cat in enumerate(cats):
            key = type_key(str(cat))
            if key not in self.index:
                self.index[key] = len(self.names)
                self.names.append(str(cat))
            lookup[i] = self.index[key]
        return lookup[codes]


def _folds(donors: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Two calibration folds: donors alternate between them (sorted names), so a fold's model
    meets new donors as the query's will; with a single donor, cells are halved at random."""
    names = sorted({str(d) for arr in donors for d in np.unique(arr)})
    if len(names) >= 2:
        fold_of = {n: i % 2 for i, n in enumerate(names)}
        return [np.asarray([fold_of[str(d)] for d in arr], dtype=np.int8) for arr in donors]
    rng = np.random.default_rng([seed, 2])
    return [rng.integers(0, 2, size=arr.size).astype(np.int8) for arr in donors]


def _h5ad_reference(path: Path, settings: AnnotateSettings) -> Reference:
    from cellpuzzle_cli.build_context.fields import ContextFields
    from cellpuzzle_cli.build_context.plan import plan_file
    from cellpuzzle_cli.build_context.settings import ContextSettings

    config = ContextSettings(cell_type_col=settings.cell_type_col,
                           cell_type_id_col=settings.cell_type_id_col, gene_col=settings.gene_col,
                           seed=settings.seed, chunk_cells=settings.chunk_cells)
    no_fields = ContextFields((), (), frozenset(), "", "annotate")
    types = _Types()
    files, donors, notes = [], [], []
    genes: set[str] = set()
    sources = set()
    for file, root in find_files([path], (".h5ad",), "reference"):
        plan = plan_file(file, root, config, no_fields, Path("."))
        notes.extend(f"{file}: {w}" for w in plan.report.warnings
                     if "donor group" not in w and "Ensembl" not in w)
        codes = types.codes(*plan.cell_type)
        donor_codes, donor_names = plan.donor
        donors.append(np.asarray(donor_names, dtype=object)[donor_codes])
        files.append(RefFile(file, codes, np.zeros(0, np.int8), plan, plan.genes))
        genes.update(str(g) for g in plan.genes)
        sources.add(plan.report.genes_from.split(".")[-1] if "." in plan.report.genes_from
                    else "var names")
    for ref_file, folds in zip(files, _folds(donors, settings.seed)):
        ref_file.folds = folds
    counts = np.bincount(np.concatenate([f.types for f in files]), minlength=len(types.names))
    gene_array = np.asarray(sorted(genes), dtype=object)
    return Reference("h5ad", path, files, types.names, counts, gene_array,
                     f"{naming(gene_array)} from {', '.join(sorted(sources))}", notes=notes)


def _cells_reference(path: Path) -> Reference:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    types = _Types()
    files, donors = [], []
    genes: set[str] = set()
    longest = 0
    for file, _ in find_files([path], (".parquet",), "reference"):
        try:
            pf = pq.ParquetFile(file)
        except Exception as exc:  # pyarrow raises several types for damaged files
            raise UserError(f"{file} could not be read as Parquet ({exc}).") from exc
        missing = [c for c in ("top_genes", "cell_type") if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{file} has no column {', '.join(missing)}, so it is not a "
                            "build-context cell table. Give the folder build-context wrote, or "
                            "a labelled .h5ad.")
        cols = ["top_genes", "cell_type"] + (["donor_id"] if "donor_id" in pf.schema_arrow.names
                                             else [])
        codes, donor = [], []
        for batch in pf.iter_batches(columns=cols, batch_size=65_536):
            top = batch.column("top_genes")
            genes.update(pc.unique(pc.list_flatten(top)).to_pylist())
            longest = max(longest, int(pc.max(pc.list_value_length(top)).as_py() or 0))
            labels = batch.column("cell_type").dictionary_encode()
            label_codes = pc.fill_null(labels.indices, -1).to_numpy(zero_copy_only=False)
            codes.append(types.codes(label_codes, np.asarray(labels.dictionary.to_pylist(),
                                                             dtype=object)))
            donor.append(np.asarray(batch.column("donor_id").to_pylist() if "donor_id" in cols
                                    else [""] * batch.num_rows, dtype=object))
        files.append(RefFile(file, np.concatenate(codes) if codes else np.zeros(0, np.int32),
                             np.zeros(0, np.int8)))
        donors.append(np.concatenate(donor) if donor else np.zeros(0, dtype=object))
    for ref_file, folds in zip(files, _folds(donors, 0)):
        ref_file.folds = folds
    every = np.concatenate([f.types for f in files])
    counts = np.bincount(every[every >= 0], minlength=len(types.names))
    gene_array = np.asarray(sorted(g for g in genes if g), dtype=object)
    return Reference("cells", path, files, types.names, counts, gene_array,
                     f"{naming(gene_array)} from build-context's top_genes", max_list=longest)
