"""Labels from ontology term IDs, for files that carry `<field>_ontology_term_id` columns.

CELLxGENE files name every curated field twice: `cell_type` and `cell_type_ontology_term_id`,
`tissue` and `tissue_ontology_term_id`, … . Files before publication carry only the ID columns;
the labels are then read from the ontologies `cellxgene-ontology-guide` ships (offline), so the
default options work on both. The cell type's IDs are also kept as an output column, so score
can give ontology-aware credit downstream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellpuzzle_cli.build_context.h5ad import Coded, Frame
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.ontology import ID_SUFFIX, term_label

ID_COLUMN = "cell_type_ontology_term_id"   # the output column (CELLxGENE's name)


_RESOLVED = "obs has only ontology term IDs for "


def resolved_note(fields: list[str]) -> str:
    """The one line build-context prints when it read labels from ontologies."""
    return (f"{_RESOLVED}{', '.join(fields)}; their labels were read from the ontologies "
            "shipped with cellxgene-ontology-guide (CL, UBERON, MONDO, PATO, HsapDv, "
            "HANCESTRO, …).")


def is_resolved_note(text: str) -> bool:
    return text.startswith(_RESOLVED)


def labels_from_terms(frame: Frame, column: str) -> Coded | None:
    """`column`'s labels resolved from `<column>_ontology_term_id`; None without that column.

    An ID no shipped ontology knows keeps the ID as its label, so nothing is silently lost.
    """
    id_column = f"{column}{ID_SUFFIX}"
    if id_column not in frame.columns:
        return None
    codes, cats = frame.column(id_column)
    labels = np.asarray([term_label(c) or c for c in cats], dtype=object)
    return codes, labels


def cell_type_terms(frame: Frame, id_col: str | None, path: Path) -> Coded | None:
    """The cell type's term IDs: `id_col` (required when given), else CELLxGENE's default."""
    if id_col is not None and id_col not in frame.columns:
        raise UserError(f"{path}: obs has no column '{id_col}'. Columns present: "
                        f"{', '.join(frame.columns) or '(none)'}. Pass --cell-type-id-col with "
                        "the column of cell type ontology IDs, or leave it out.")
    column = id_col or ID_COLUMN
    return frame.column(column) if column in frame.columns else None
