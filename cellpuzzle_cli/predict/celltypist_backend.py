"""`predict --backend celltypist`: a full-expression reference next to the text-only models.

The baseline and the LLMs see only the puzzle text (each cell's top genes). CellTypist, the
classifier biologists use, sees every gene: the gap between the two is what the puzzle format
itself loses. The model is trained here, on the training split's cells only (never downloaded),
from the expression in the `.h5ad` files build-context read (recorded in the manifest).

Steps: the cells named by the puzzles' `cell_ids` are read from their files (only those rows,
with build-context's row reader and its choice of matrix: X, or .raw.X / a counts layer when X
is scaled); expression is brought to what CellTypist expects, log1p of counts normalised to
10,000 per cell, from what build-context's probe says the matrix holds (counts and TPM/CPM-like
values are proportional already; a log-normalised matrix is first undone with expm1);
`celltypist.train` fits
its logistic regression; `celltypist.annotate` gives per-cell decision scores for the test
cells; and each puzzle's cells get distinct candidates by the Hungarian algorithm on the
log-probabilities, as the baseline assigns its likelihoods (an open-set puzzle's extra
candidates are simply columns that may go unused).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.answer import format_prediction
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.base import Generation

_UNKNOWN_SCORE = -50.0  # log-probability of a candidate type the model never saw in training


@dataclass
class CellSource:
    """One dataset's `.h5ad` file: the matrix build-context ranked, its genes and cell rows."""

    dataset: str
    spec: Any            # context.h5ad.MatrixSpec
    genes: np.ndarray
    rows: dict[str, int]
    values: Any = None   # context.values.MatrixValues: what the matrix holds


def match_sources(h5ads: Iterable[Path], datasets: Iterable[str]) -> dict[str, Path]:
    """Each dataset name (the file's path below the folder build-context was given, without
    `.h5ad`) matched to the one recorded input file whose path ends with it."""
    files = [Path(p) for p in h5ads]
    found: dict[str, Path] = {}
    for dataset in sorted(set(datasets)):
        hits = [f for f in files if f.with_suffix("").as_posix() == dataset
                or f.with_suffix("").as_posix().endswith("/" + dataset)]
        if len(hits) != 1:
            listed = ", ".join(str(f) for f in files) or "(none)"
            raise UserError(f"The puzzles' dataset '{dataset}' matches {len(hits)} of the .h5ad "
                            f"files build-context read ({listed}). --backend celltypist reads "
                            "expression from those files: run it with the manifest of the "
                            "build-context run that made these puzzles, with the files in place.")
        found[dataset] = hits[0]
    return found


def open_source(dataset: str, path: Path) -> CellSource:
    """The matrix, genes and row of every cell id, read the way build-context reads them."""
    from cellpuzzle_cli.build_context.h5ad import choose_matrix, gene_names, open_h5ad

    opened = open_h5ad(path)
    try:
        spec, var, values, _ = choose_matrix(opened, path)
        where = "raw.var" if spec.label == "raw.X" else "var"
        genes, _ = gene_names(var, None, path, where, [], refuse_repeats=False)  # made unique
        ids = opened.obs.index()
    finally:
        opened.close()
    return CellSource(dataset, spec, genes, {str(c): i for i, c in enumerate(ids)}, values)


def read_expression(source: CellSource, cell_ids: Sequence[str]) -> Any:
    """The cells' rows (in the order given) as CSR, log1p of counts per 10,000."""
    from cellpuzzle_cli.build_context.rows import read_rows_csr
    from cellpuzzle_cli.build_context.values import log1p_cp10k

    missing = [c for c in cell_ids if c not in source.rows]
    if missing:
        raise UserError(f"Cell '{missing[0]}' of the puzzles is not in {source.spec.path} "
                        f"({len(missing)} missing). The file changed since build-context read "
                        "it; rebuild the cells and puzzles from the current file.")
    wanted = np.asarray([source.rows[c] for c in cell_ids], dtype=np.int64)
    unique, back = np.unique(wanted, return_inverse=True)
    block = read_rows_csr(source.spec, unique)
    return log1p_cp10k(block, source.values)[back]


def import_celltypist() -> Any:
    """celltypist configures the root logger at import; undo that so only our output shows."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import celltypist
        from celltypist import logger as ct_logger
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    ct_logger.set_level(logging.WARNING)
    return celltypist


class CellTypistBackend:
    """CellTypist trained on the training split's cells; one-to-one assignment per puzzle."""

    name = "celltypist"
    model_label = "celltypist"
    default_batch_size = 256

    def __init__(self, train_records: Sequence[dict[str, Any]], h5ads: Sequence[Path]):
        if not h5ads:
            raise UserError("--backend celltypist reads full expression from the .h5ad files "
                            "build-context read, and the manifest records no build-context run. "
                            "Run build-context, make-qa and split with the same --manifest first.")
        self.h5ads = [Path(p) for p in h5ads]
        self.sources: dict[str, CellSource] = {}
        self.model = self._train(_cells_of(train_records, "training"))

    def _source(self, dataset: str) -> CellSource:
        if dataset not in self.sources:
            path = match_sources(self.h5ads, [dataset])[dataset]
            self.sources[dataset] = open_source(dataset, path)
        return self.sources[dataset]

    def _adata(self, dataset: str, cell_ids: Sequence[str]) -> Any:
        import anndata

        source = self._source(dataset)
        adata = anndata.AnnData(read_expression(source, cell_ids))
        adata.var_names = [str(g) for g in source.genes]
        adata.var_names_make_unique()
        return adata

    def _train(self, cells: list[tuple[str, str, str]]) -> Any:
        import anndata

        celltypist = import_celltypist()
        parts = []
        for dataset in sorted({d for d, _, _ in cells}):
            chosen = [(c, t) for d, c, t in cells if d == dataset]
            adata = self._adata(dataset, [c for c, _ in chosen])
            adata.obs["cell_type"] = [t for _, t in chosen]
            parts.append(adata)
        adata = parts[0] if len(parts) == 1 else anndata.concat(parts, join="inner")
        if adata.n_vars == 0:
            raise UserError("The training datasets share no gene names, so one CellTypist model "
                            "cannot be trained on them. Build the puzzles from files with a "
                            "common gene annotation.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return celltypist.train(adata, labels="cell_type", n_jobs=1, check_expression=True)

    def sort_key(self, record: dict[str, Any]) -> int:
        return 0

    def recover(self) -> None:
        pass

    def generate(self, records: list[dict[str, Any]]) -> list[Generation]:
        scores = self._decision_scores(records)
        out = []
        for record in records:
            rows = scores[record["puzzle_id"]]
            out.append(Generation([self._answer(record, rows)]))
        return out

    def _decision_scores(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Per puzzle, the decision-score table (cells × model types) of its cells."""
        celltypist = import_celltypist()
        cells = _cells_of(records, "test")
        out: dict[str, list[Any]] = {r["puzzle_id"]: [] for r in records}
        for dataset in sorted({d for d, _, _ in cells}):
            ids = list(dict.fromkeys(c for d, c, _ in cells if d == dataset))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = celltypist.annotate(self._adata(dataset, ids), model=self.model,
                                             majority_voting=False)
            table = result.decision_matrix
            table.index = ids
            for record in records:
                if record.get("dataset") == dataset:
                    out[record["puzzle_id"]] = table.loc[[str(c) for c in record["cell_ids"]]]
        return out

    def _answer(self, record: dict[str, Any], table: Any) -> str:
        from cellpuzzle_cli.baseline import assign
        from cellpuzzle_cli.prompts import parse_question, record_question

        _, candidates = parse_question(record_question(record))
        by_lower = {str(c).lower(): c for c in table.columns}
        log_prob = -np.logaddexp(0.0, -table.to_numpy(dtype=np.float64))   # log expit(score)
        matrix = np.full((len(table), len(candidates)), _UNKNOWN_SCORE)
        for j, cand in enumerate(candidates):
            col = by_lower.get(cand.lower())
            if col is not None:
                matrix[:, j] = log_prob[:, list(table.columns).index(col)]
        choice = assign(matrix)
        items = [candidates[j] for j in choice]
        think = (f"CellTypist (logistic regression on {len(self.model.features)} genes of full "
                 f"expression) scored each cell against the {len(candidates)} candidates; the "
                 "cells were given distinct types by the Hungarian algorithm on log-probabilities.")
        return format_prediction(think, items)


def _cells_of(records: Sequence[dict[str, Any]], what: str) -> list[tuple[str, str, str]]:
    """(dataset, cell id, gold type) of every cell the records name, each cell once."""
    from cellpuzzle_cli.answer import answer_items, record_answer

    seen: dict[tuple[str, str], str] = {}
    for i, record in enumerate(records):
        ids, dataset = record.get("cell_ids"), record.get("dataset")
        if not ids or dataset is None:
            raise UserError(f"Record {i} of the {what} puzzles has no `cell_ids`/`dataset`, so "
                            "--backend celltypist cannot find its cells' expression. Use the "
                            "split files `cellpuzzle split` writes (other exports carry only "
                            "the puzzle text; use --backend baseline for those).")
        gold = answer_items(record_answer(record))
        labels = gold if len(gold) == len(ids) else [""] * len(ids)
        for cell, label in zip(ids, labels):
            seen.setdefault((str(dataset), str(cell)), label)
    return [(d, c, t) for (d, c), t in seen.items()]
