"""`--backend celltypist`: CellTypist trained on the reference, or the user's model file.

Training reads the reference's cells with build-context's row reader (from a build-context
folder, from the `.h5ad` files it was built from, as predict's CellTypist backend does),
brings them to log1p of counts per 10,000, keeps the genes the query has, and calls
`celltypist.train` with its defaults. A reference above `max_cells_in_memory` cells is
subsampled (seeded), because CellTypist trains in memory. Query cells are read chunk by chunk
and passed to `celltypist.annotate` (no majority voting: clusters are ours). Its one-vs-rest
probabilities become the evidence; where they add up to less than 1 the rest is "none".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.annotate.evidence import Evidence
from cellpuzzle_cli.annotate.query import QueryFile
from cellpuzzle_cli.annotate.reference import Reference
from cellpuzzle_cli.annotate.settings import AnnotateSettings
from cellpuzzle_cli.build_context.values import MatrixValues, log1p_cp10k
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress
from cellpuzzle_cli.markers import type_key

_CHUNK_CELLS = 2_000          # CellTypist densifies each chunk's model genes
MARKERS_SHOWN = 5


def quiet_celltypist() -> Any:
    """celltypist, imported without its logging set-up (predict's helper)."""
    from cellpuzzle_cli.predict.celltypist_backend import import_celltypist

    try:
        return import_celltypist()
    except ImportError as exc:
        raise UserError(f"--backend celltypist needs CellTypist, which is not installed ({exc}). "
                        "Install the evaluation extra (pip install 'cellpuzzle[eval]'), or use "
                        "--backend baseline.") from exc


class CellTypistBackend:
    """CellTypist's logistic regression; `evidence` gives its per-cell probabilities."""

    name = "celltypist"

    def __init__(self, reference: Reference | None, query_genes: set[str],
                 settings: AnnotateSettings, reference_h5ads: Sequence[Path], notes: list[str],
                 progress: Progress | None = None):
        from cellpuzzle_cli.annotate.safe_model import load_celltypist_model

        if settings.celltypist_model is not None:
            self.model = load_celltypist_model(settings.celltypist_model)
            self.model_label = f"CellTypist model {settings.celltypist_model}"
        else:
            self.model = self._train(reference, query_genes, settings, reference_h5ads, notes,
                                     progress)
            self.model_label = (f"CellTypist (celltypist.train defaults) trained on "
                                f"{reference.path}")
        self.types = [str(t) for t in self.model.cell_types]
        self.features = np.asarray([str(g) for g in self.model.features], dtype=object)
        self.model_label += f" ({len(self.types)} types, {self.features.size:,} genes)"

    def _train(self, reference: Reference, query_genes: set[str], settings: AnnotateSettings,
               reference_h5ads: Sequence[Path], notes: list[str],
               progress: Progress | None) -> Any:
        import anndata

        celltypist = quiet_celltypist()
        if reference.kind == "cells":
            matrix, genes, labels = _from_tables(reference, reference_h5ads)
        else:
            matrix, genes, labels = _from_h5ad(reference, settings, notes, progress)
        shared = np.flatnonzero(np.isin(genes, np.asarray(sorted(query_genes), dtype=object)))
        _, first = np.unique(genes[shared], return_index=True)
        shared = np.sort(shared[first])
        adata = anndata.AnnData(matrix[:, shared])
        adata.var_names = [str(g) for g in genes[shared]]
        adata.obs["cell_type"] = labels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return celltypist.train(adata, labels="cell_type", n_jobs=1, check_expression=False)

    def evidence(self, query: QueryFile, clusters: np.ndarray, n_clusters: int, pool: Any,
                 progress: Progress | None) -> Evidence:
        """Each query cell's CellTypist probabilities; a cluster's markers are the genes whose
        scaled expression times the label's coefficient adds most to its score."""
        import anndata
        import scipy.sparse as sp

        celltypist = quiet_celltypist()
        column: dict[str, int] = {}
        for j, g in enumerate(query.genes):
            column.setdefault(str(g), j)
        found = np.asarray([column.get(g, -1) for g in self.features])
        matched = np.flatnonzero(found >= 0)
        prob = np.empty((query.n_cells, len(self.types) + 1), dtype=np.float32)
        sums = np.zeros((n_clusters, matched.size))
        empty = np.zeros(query.n_cells, dtype=bool)
        for rows in query.chunks():
            for part in np.array_split(rows, max(1, -(-rows.size // _CHUNK_CELLS))):
                block = query.normalised(part)[:, found[matched]]
                empty[part] = block.getnnz(axis=1) == 0
                adata = anndata.AnnData(block)
                adata.var_names = [str(g) for g in self.features[matched]]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = celltypist.annotate(adata, model=self.model,
                                                 majority_voting=False)
                p = result.probability_matrix[self.types].to_numpy(dtype=np.float64)
                p /= np.maximum(1.0, p.sum(axis=1, keepdims=True))
                prob[part, :-1] = p
                prob[part, -1] = 1.0 - p.sum(axis=1)
                owner = sp.csr_matrix((np.ones(part.size), (clusters[part], np.arange(part.size))),
                                      shape=(n_clusters, part.size))
                sums += np.asarray((owner @ block).todense())
            if progress:
                progress(rows.size)
        sizes = np.maximum(np.bincount(clusters, minlength=n_clusters), 1)
        return Evidence(prob, self._markers(sums / sizes[:, None], matched), empty=empty)

    def _markers(self, means: np.ndarray, matched: np.ndarray) -> Any:
        scaler, classes = self.model.scaler, list(self.model.classifier.classes_)
        coef = self.model.classifier.coef_[:, matched]
        centre = scaler.mean_[matched] if scaler.with_mean else 0.0
        scaled = np.minimum((means - centre) / scaler.scale_[matched], 10.0)
        names = self.features[matched]

        def markers(cluster: int, type_index: int) -> list[str]:
            gain = scaled[cluster] * coef[classes.index(self.types[type_index])]
            order = np.lexsort((np.arange(gain.size), -gain))
            return [str(names[i]) for i in order[:MARKERS_SHOWN] if gain[i] > 0]

        return markers


def _from_h5ad(reference: Reference, settings: AnnotateSettings, notes: list[str],
               progress: Progress | None) -> tuple[Any, np.ndarray, np.ndarray]:
    """(log-normalised CSR, genes, labels) of the reference's cells, subsampled if needed."""
    import scipy.sparse as sp

    from cellpuzzle_cli.build_context.rows import read_rows_csr

    genes = [np.asarray(f.genes, dtype=object) for f in reference.files]
    if any(g.size != genes[0].size or (g != genes[0]).any() for g in genes[1:]):
        raise UserError(f"The reference files in {reference.path} name different genes, so one "
                        "CellTypist model cannot be trained on them together. Give files with "
                        "one gene annotation, or use --backend baseline.")
    total = reference.n_cells
    rng = np.random.default_rng([settings.seed, 4])
    keep = np.ones(total, dtype=bool)
    if total > settings.max_cells_in_memory:
        keep[:] = False
        keep[rng.choice(total, settings.max_cells_in_memory, replace=False)] = True
        notes.append(f"CellTypist was trained on {settings.max_cells_in_memory:,} of the "
                     f"reference's {total:,} cells (seeded), because it trains in memory.")
    blocks, labels, offset = [], [], 0
    for f in reference.files:
        plan = f.plan
        mine = keep[offset:offset + f.types.size] & (f.types >= 0)
        offset += f.types.size
        for a, b in plan.chunks():
            pick = np.flatnonzero(mine[a:b]) + a
            if pick.size:
                block = read_rows_csr(plan.matrix, plan.kept[pick], plan.in_memory)
                blocks.append(log1p_cp10k(block, MatrixValues(plan.report.values,
                                                              plan.report.values_total)))
                labels.extend(reference.types[t] for t in f.types[pick])
            if progress:
                progress(b - a)
    return sp.vstack(blocks, format="csr"), genes[0], np.asarray(labels, dtype=object)


def _from_tables(reference: Reference, h5ads: Sequence[Path]) -> tuple[Any, np.ndarray,
                                                                        np.ndarray]:
    """The cells of a build-context folder, expression read from the files it was built from."""
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from cellpuzzle_cli.predict.celltypist_backend import (
        match_sources,
        open_source,
        read_expression,
    )

    if not h5ads:
        raise UserError(f"--backend celltypist trains on full expression, and {reference.path} "
                        "is a build-context folder (top genes only). Pass the .h5ad files it "
                        "was built from (the manifest records them), or give the labelled "
                        ".h5ad itself as the reference.")
    gone = [str(p) for p in h5ads if not Path(p).exists()]
    if gone:
        raise UserError(f"The .h5ad files {reference.path} was built from (the manifest records "
                        f"them) are no longer there: {', '.join(gone)}. --backend celltypist "
                        "reads their expression: put them back, or give the labelled .h5ad "
                        "itself as the reference.")
    tables = [pq.read_table(f.path, columns=["cell_id", "dataset", "cell_type"])
              for f in reference.files]
    rows = [r for t in tables for r in t.to_pylist()]
    sources = match_sources(h5ads, [r["dataset"] for r in rows])
    blocks, labels, genes = [], [], None
    for dataset, path in sources.items():
        source = open_source(dataset, path)
        if genes is not None and (source.genes.size != genes.size or (source.genes != genes).any()):
            raise UserError("The .h5ad files behind the reference name different genes, so one "
                            "CellTypist model cannot be trained on them together. Use "
                            "--backend baseline.")
        genes = source.genes
        mine = [r for r in rows if r["dataset"] == dataset]
        blocks.append(read_expression(source, [str(r["cell_id"]) for r in mine]))
        labels.extend(r["cell_type"] for r in mine)
    known = {type_key(t): t for t in reference.types}
    return (sp.vstack(blocks, format="csr").astype(np.float32), genes,
            np.asarray([known.get(type_key(str(t)), str(t)) for t in labels], dtype=object))
