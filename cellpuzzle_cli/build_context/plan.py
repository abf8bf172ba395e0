"""The work plan: per file, the cells to keep, their labels and context, and the chunking.

Everything cheap (metadata) is decided here, before any expression row is read, so a bad column
name or an empty file fails in seconds and the worker processes only ever read rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cellpuzzle_cli.build_context.fields import ContextFields, Field, render_contexts
from cellpuzzle_cli.build_context.h5ad import (
    Coded,
    Frame,
    MatrixSpec,
    choose_matrix,
    gene_names,
    open_h5ad,
    refuse_duplicates,
)
from cellpuzzle_cli.build_context.label_policy import apply_label_policy
from cellpuzzle_cli.build_context.labels import cell_type_terms, labels_from_terms, resolved_note
from cellpuzzle_cli.build_context.settings import ContextSettings
from cellpuzzle_cli.build_context.values import MatrixValues
from cellpuzzle_cli.errors import UserError

DEFAULT_DONOR_COL = "donor_id"
_ONE_CELL_DONORS = 10   # this many cells or more, each its own donor: the donors are cells
SUSPENSION_COL = "suspension_type"
_TARGET_NNZ_PER_CHUNK = 4_000_000   # ~32 MB of values+indices per task


@dataclass
class FileReport:
    """What happened to one input file (shown as one row of the CLI's table)."""

    input: str
    output: str
    dataset: str
    cells_read: int = 0
    cells_kept: int = 0
    dropped_suspension: int = 0
    dropped_nan_type: int = 0         # no cell type: missing, or renamed to nothing
    dropped_subsample: int = 0
    dropped_no_expression: int = 0    # no expressed gene in the ranked matrix (all-zero rows)
    donors: int = 0
    cell_types: int = 0
    matrix: str = ""
    values: str = ""                  # what the ranked matrix holds: values.VALUE_KINDS
    values_total: float | None = None  # the one total its rows sum to, where they do
    genes_from: str = ""
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def cells_per_s(self) -> float:
        return self.cells_kept / self.seconds if self.seconds > 0 else 0.0

    @property
    def holds(self) -> str:
        """What the ranked matrix holds, in words (e.g. "normalised (rows sum to 1,000,000)")."""
        return MatrixValues(self.values, self.values_total).describe() if self.values else ""


@dataclass
class FilePlan:
    """Everything decided about one file before its matrix is read."""

    report: FileReport
    out_path: Path
    matrix: MatrixSpec
    genes: np.ndarray
    kept: np.ndarray                 # global row numbers, ascending
    cell_ids: np.ndarray
    donor: Coded
    batch: Coded | None
    cell_type: Coded
    fields: dict[str, Coded]
    context: Coded
    chunk_cells: int
    in_memory: Any = None            # scipy CSR when the file stores X column-wise
    cell_type_ids: Coded | None = None   # ontology term IDs, where the file has them

    def chunks(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.kept.size, self.chunk_cells):
            yield a, min(self.kept.size, a + self.chunk_cells)


def _required_column(frame: Frame, col: str, path: Path, flag: str) -> Coded:
    if col not in frame.columns:
        raise UserError(f"{path}: obs has no column '{col}'. Columns present: "
                        f"{', '.join(frame.columns) or '(none)'}. Pass {flag} with the column "
                        "that holds it.")
    return frame.column(col)


def plan_file(path: Path, root: Path, config: ContextSettings, fields: ContextFields,
              out_dir: Path, renames: dict[str, str] | None = None,
              used_renames: set[str] | None = None) -> FilePlan:
    """Read a file's metadata, choose its matrix and the cells to keep.

    Cell types pass the label policy (`label_policy`) with `renames` applied; the rename keys
    that matched are added to `used_renames`.
    """
    rel = path.relative_to(root)
    dataset = rel.with_suffix("").as_posix()
    out_rel = rel.with_suffix(".parquet")
    report = FileReport(str(path), out_rel.as_posix(), dataset)
    warnings = report.warnings
    opened = open_h5ad(path)
    try:
        obs = opened.obs
        texts, file_fields = fields.for_dataset(dataset)
        cell_type, field_codes, resolved = _labelled(obs, config, file_fields, path)
        if resolved:
            warnings.append(resolved_note(resolved))
        column = config.cell_type_col + (" (labels of its ontology IDs)"
                                         if config.cell_type_col in resolved else "")
        cell_type, notes = apply_label_policy(cell_type, renames or {}, column, path,
                                              used_renames if used_renames is not None else set())
        warnings.extend(notes)
        term_ids = cell_type_terms(obs, config.cell_type_id_col, path)
        if config.cell_type_col in fields.columns():
            raise UserError(f"The context fields ({fields.source}) include the cell-type column "
                            f"'{config.cell_type_col}', which would put the answer in the "
                            "question. Remove it from the context fields.")
        matrix, var, values, notes = choose_matrix(opened, path)
        warnings.extend(notes)
        report.values, report.values_total = values.kind, values.row_sum
        where = "raw.var" if matrix.label == "raw.X" else "var"
        genes, report.genes_from = gene_names(var, config.gene_col, path, where, warnings)
        if matrix.shape != (obs.n, genes.size):
            raise UserError(f"{path}: {matrix.label} has shape {matrix.shape} but obs has {obs.n} "
                            f"rows and {where} {genes.size}. The file is inconsistent; write it "
                            "again with anndata.")
        report.matrix = matrix.label
        report.cells_read = obs.n
        cell_ids = obs.index()
        refuse_duplicates(cell_ids, "cell ids (obs names)", path,
                          "Cell ids must name one cell each; make them unique first (anndata's "
                          "`obs_names_make_unique()`) or keep one copy of each cell.")

        kept = _keep_rows(obs, cell_type[0], config, dataset, report)
        report.cells_kept = int(kept.size)

        donor = _donor(obs, cell_ids, config, path, dataset, warnings)
        batch = None
        if config.batch_col is not None:
            batch = _required_column(obs, config.batch_col, path, "--batch-col")
        context = render_contexts(file_fields, field_codes, texts, fields, obs.n)

        def sub(c: Coded) -> Coded:
            return c[0][kept], c[1]

        in_memory = None
        if matrix.kind == "csc":
            from anndata.io import read_elem

            warnings.append(f"{matrix.label} is stored column-wise (CSC), so it was loaded whole "
                            "into memory; save the file with a CSR matrix for large data.")
            in_memory = read_elem(opened.h5[matrix.key]).tocsr()
        plan = FilePlan(report, out_dir / out_rel, matrix, genes, kept, cell_ids[kept],
                        sub(donor), sub(batch) if batch else None, sub(cell_type),
                        {k: sub(v) for k, v in field_codes.items()}, sub(context),
                        config.chunk_cells or chunk_cells_for(opened.h5, matrix), in_memory,
                        sub(term_ids) if term_ids is not None else None)
        count_groups(plan)
        return plan
    finally:
        opened.close()


def count_groups(plan: FilePlan, keep: np.ndarray | None = None) -> None:
    """The report's donors and cell types among the cells kept (`keep`: a mask over them)."""
    donors, types = plan.donor[0], plan.cell_type[0]
    if keep is not None:
        donors, types = donors[keep], types[keep]
    plan.report.donors = int(np.unique(donors).size)
    plan.report.cell_types = int(np.unique(types).size)


def _labelled(obs: Frame, config: ContextSettings, file_fields: list[Field],
              path: Path) -> tuple[Coded, dict[str, Coded], list[str]]:
    """The cell type and context-field columns, labels read from term IDs where only IDs exist.

    Returns (cell type, field codes, the columns whose labels came from ontologies).
    """
    resolved: list[str] = []
    if config.cell_type_col in obs.columns:
        cell_type = obs.column(config.cell_type_col)
    else:
        from_terms = labels_from_terms(obs, config.cell_type_col)
        if from_terms is None:   # neither labels nor IDs: the error lists the columns present
            return _required_column(obs, config.cell_type_col, path, "--cell-type-col"), {}, []
        cell_type = from_terms
        resolved.append(config.cell_type_col)
    field_codes: dict[str, Coded] = {}
    for f in file_fields:
        if f.column in obs.columns:
            field_codes[f.column] = obs.column(f.column)
        elif (from_terms := labels_from_terms(obs, f.column)) is not None:
            field_codes[f.column] = from_terms
            resolved.append(f.column)
    return cell_type, field_codes, resolved


def _keep_rows(obs: Frame, cell_type_codes: np.ndarray, config: ContextSettings, dataset: str,
               report: FileReport) -> np.ndarray:
    """Rows of whole cells with a cell type, subsampled to --max-cells; counts what was dropped."""
    keep = np.ones(obs.n, dtype=bool)
    if SUSPENSION_COL in obs.columns:
        codes, cats = obs.column(SUSPENSION_COL)
        is_cell = np.isin(codes, np.flatnonzero(cats == "cell"))
        report.dropped_suspension = int((~is_cell).sum())
        keep &= is_cell
    nan_type = cell_type_codes < 0
    report.dropped_nan_type = int((nan_type & keep).sum())
    kept = np.flatnonzero(keep & ~nan_type)
    if config.max_cells is not None and kept.size > config.max_cells:
        rng = np.random.default_rng([config.seed, zlib.crc32(dataset.encode())])
        chosen = np.sort(rng.choice(kept.size, config.max_cells, replace=False))
        report.dropped_subsample = int(kept.size - config.max_cells)
        kept = kept[chosen]
    if kept.size == 0:
        raise UserError(
            f"{report.input}: no cells left after filtering ({obs.n} read, "
            f"{report.dropped_suspension} with {SUSPENSION_COL} other than 'cell', "
            f"{report.dropped_nan_type} without a cell type in '{config.cell_type_col}'). "
            "Check --cell-type-col and --rename, or leave this file out.")
    return kept


def donors_from_ids(cell_ids: np.ndarray, regex: str, path: Path) -> Coded:
    """`--donor-from-id`: each cell's donor is the first group of `regex` searched in its id.
    Every id must match (with a non-empty group): a cell without a donor would land in a
    group it does not belong to, so the first one that does not is named in the error."""
    from cellpuzzle_cli.build_context.settings import donor_pattern

    pattern = donor_pattern(regex)
    donors = []
    for cell_id in cell_ids:
        found = pattern.search(cell_id)
        donor = found.group(1) if found else None
        if not donor:
            bad = sum(1 for c in cell_ids if not ((m := pattern.search(c)) and m.group(1)))
            raise UserError(f"{path}: cell id '{cell_id}' does not match --donor-from-id "
                            f"'{regex}' (or its first group is empty); {bad:,} of "
                            f"{len(cell_ids):,} ids do not. Every cell needs a donor: fix the "
                            "regex (it is searched in each id; its first group is the donor), "
                            "or use --donor-col with an obs column.")
        donors.append(donor)
    cats, codes = np.unique(np.asarray(donors, dtype=object), return_inverse=True)
    return codes.astype(np.int32), cats.astype(object)


def _donor(obs: Frame, cell_ids: np.ndarray, config: ContextSettings, path: Path, dataset: str,
           warnings: list[str]) -> Coded:
    donor = _donor_codes(obs, cell_ids, config, path, dataset, warnings)
    codes = donor[0]
    if codes.size >= _ONE_CELL_DONORS and np.unique(codes).size == codes.size:
        source = (f"--donor-from-id '{config.donor_from_id}'" if config.donor_from_id is not None
                  else f"the column '{config.donor_col or DEFAULT_DONOR_COL}'")
        warnings.append(f"Each of the {codes.size:,} cells is a donor group of its own (donors "
                        f"from {source}), so no puzzle can hold several cells of one donor. "
                        "Check that it names donors, not cells (a --donor-from-id group should "
                        "capture the donor part of the id only).")
    return donor


def _donor_codes(obs: Frame, cell_ids: np.ndarray, config: ContextSettings, path: Path,
                 dataset: str, warnings: list[str]) -> Coded:
    if config.donor_from_id is not None:
        return donors_from_ids(cell_ids, config.donor_from_id, path)
    if config.donor_col is not None:
        codes, cats = _required_column(obs, config.donor_col, path, "--donor-col")
    elif DEFAULT_DONOR_COL in obs.columns:
        codes, cats = obs.column(DEFAULT_DONOR_COL)
    else:
        warnings.append(f"No '{DEFAULT_DONOR_COL}' column: all cells are one donor group named "
                        f"'{dataset}'. Pass --donor-col if donors are recorded in another column.")
        return np.zeros(obs.n, dtype=np.int32), np.asarray([dataset], dtype=object)
    missing = int((codes < 0).sum())
    if missing:
        warnings.append(f"{missing} cells have no donor; they form one group named 'unknown'.")
        cats = np.append(cats, "unknown").astype(object)
        codes = np.where(codes < 0, cats.size - 1, codes).astype(np.int32)
    return codes, cats


def chunk_cells_for(h5: h5py.File, matrix: MatrixSpec) -> int:
    n_rows, n_cols = matrix.shape
    if matrix.kind == "csr":
        nnz = int(h5[matrix.key]["indptr"][-1]) if n_rows else 0
        per_row = max(1.0, nnz / max(1, n_rows))
    else:
        per_row = float(max(1, n_cols))
    return int(np.clip(_TARGET_NNZ_PER_CHUNK / per_row, 64, 8192))


def check_unique_outputs(plans: list[FilePlan]) -> None:
    seen: dict[str, str] = {}
    for p in plans:
        other = seen.setdefault(p.report.output, p.report.input)
        if other != p.report.input:
            raise UserError(f"{other} and {p.report.input} would both be written to "
                            f"{p.report.output}. Give their common parent folder as the input "
                            "instead, so the output mirrors their folders.")
