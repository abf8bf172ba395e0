"""run_annotate: one query (file or folder) against a reference, published atomically."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.annotate.cluster import Clustering, cluster_query, given_clusters
from cellpuzzle_cli.annotate.decide import UNASSIGNED, Decision, decide, smooth
from cellpuzzle_cli.annotate.evaluate import mismatch_warning
from cellpuzzle_cli.annotate.evidence import Backend, Evidence
from cellpuzzle_cli.annotate.model_backend import ModelBackend, TrainedModel
from cellpuzzle_cli.annotate.output import obs_columns, write_annotated, write_clusters
from cellpuzzle_cli.annotate.query import QueryFile, naming, open_query
from cellpuzzle_cli.annotate.ranks import Vocabulary
from cellpuzzle_cli.annotate.reference import Reference, open_reference
from cellpuzzle_cli.annotate.settings import MODEL_BACKENDS, AnnotateSettings
from cellpuzzle_cli.config import check_settings, save_settings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, atomic_output_dir, find_files, labelled
from cellpuzzle_cli.markers import type_key


@dataclass
class FileResult:
    """What happened to one query file."""

    input: str
    output: str
    cells: int
    clusters: int
    clustering: str
    assigned: int
    labels: dict[str, int]
    mean_confidence: float
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    evaluation: dict[str, Any] = field(default_factory=dict)   # with --truth-col
    warnings: list[str] = field(default_factory=list)          # also said in the run's warnings


@dataclass
class AnnotateResult:
    """What one annotate run wrote (the CLI prints it; the manifest keeps `summary()`)."""

    out_dir: Path
    backend: str
    model: str
    reference: str
    candidates: list[str]
    label_by: str
    files: list[FileResult]
    warnings: list[str]
    seconds: float

    @property
    def cells(self) -> int:
        return sum(f.cells for f in self.files)

    def evaluation_lines(self) -> list[str]:
        """Agreement with known labels (--truth-col), one line per file."""
        from cellpuzzle_cli.annotate.evaluate import describe

        return [describe(f.output, f.evaluation) for f in self.files if f.evaluation]

    def summary(self) -> dict[str, Any]:
        """Counts and choices, no timings (equal runs give equal summaries)."""
        return {"backend": self.backend, "model": self.model, "reference": self.reference,
                "candidates": list(self.candidates), "label_by": self.label_by,
                "files": [{k: v for k, v in asdict(f).items() if k != "seconds"}
                          for f in self.files], "warnings": list(self.warnings)}


def run_annotate(query: Path | Sequence[Path], reference: Path | None, out_dir: Path,
                 settings: AnnotateSettings | None = None, *,
                 reference_h5ads: Sequence[Path] = (), model: TrainedModel | None = None,
                 trust_remote_code: bool = False, overwrite: bool = False,
                 progress: Progress | None = None) -> AnnotateResult:
    """Label every cell of the query's `.h5ad` file(s) with the reference's types.

    `reference`: a labelled `.h5ad` (file or folder) or a build-context output folder; for
    `--backend celltypist` from a build-context folder, `reference_h5ads` are the files it was
    built from; for `--backend hf|vllm`, `model` is the trained model that answers puzzles (the
    reference, if any, only names the candidates). Writes into `out_dir` (atomically): each
    query file with the new obs columns and uns['cellpuzzle'], clusters.tsv, annotate.png and
    annotate.yaml.
    """
    started = time.perf_counter()
    settings = check_settings(settings or AnnotateSettings())
    if settings.backend in MODEL_BACKENDS and model is None:
        raise UserError(f"--backend {settings.backend} needs a trained model: pass --model.")
    inputs = [query] if isinstance(query, (str, Path)) else list(query)
    files = query_files(inputs, out_dir)
    warnings: list[str] = []
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        queries = [open_query(path, root, settings.cluster_col, settings.gene_col,
                              settings.chunk_cells, settings.truth_col) for path, root in files]
        _check_outputs(queries)
        ref = _reference(reference, settings, model)
        if ref is not None:
            warnings.extend(ref.notes)
        pool, depth = _pool(settings, queries, ref)
        try:
            if model is not None:
                backend = _model_backend(model, ref, settings, Path(out_dir), trust_remote_code)
            else:
                backend = _backend(ref, queries, settings, reference_h5ads, pool, depth,
                                   warnings, labelled(progress, "reference"))
            names, columns = _candidates(backend, settings, ref)
            results, rows, panels = [], [], []
            made_from = str(reference) if reference is not None else str(settings.celltypist_model)
            for q in queries:
                result, table, panel = _annotate_file(q, backend, names, columns, settings, pool,
                                                      tmp, made_from, progress)
                results.append(result)
                warnings.extend(result.warnings)
                rows.extend(table)
                panels.append(panel)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            from cellpuzzle_cli.build_context.rows import close_cached_files

            close_cached_files()
        write_clusters(tmp / "clusters.tsv", rows)
        if settings.plot:
            from cellpuzzle_cli.annotate.plot import plot_annotation

            plot_annotation(tmp / "annotate.png", panels, UNASSIGNED)
        save_settings(tmp, "annotate", settings)
    if model is not None:
        warnings.extend(_votes_warning(backend))
        backend.finished()
    return AnnotateResult(Path(out_dir), backend.name, backend.model_label,
                          str(reference) if reference is not None else "", names,
                          "cluster" if settings.by_cluster else "cell", results, warnings,
                          time.perf_counter() - started)


def query_files(inputs: Sequence[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """The query's .h5ad files, (file, root) as find_files gives them, leaving out any under an
    output folder inside the query folder: annotated files written there are results, not more
    queries, when the command runs again. (An output that is the query or holds it is the
    runner's to refuse.)"""
    out = Path(out_dir).resolve()
    found = [(f, root) for f, root in find_files([Path(p) for p in inputs], (".h5ad",), "query")
             if not (root.resolve() in out.parents and out in f.resolve().parents)]
    if not found:
        raise UserError(f"No .h5ad files found in {', '.join(map(str, inputs))}"
                        + (f" outside the output folder {out_dir}" if out_dir else "")
                        + ". Point annotate at an .h5ad file or a folder that holds them.")
    return found


def _reference(path: Path | None, settings: AnnotateSettings,
               model: TrainedModel | None) -> Reference | None:
    if path is None:
        if model is not None or (settings.backend == "celltypist"
                                 and settings.celltypist_model is not None):
            return None
        raise UserError("annotate needs labelled data to learn from: pass --reference with a "
                        "labelled .h5ad (file or folder) or a build-context output folder"
                        + (", or a CellTypist model file" if settings.backend == "celltypist"
                           else "") + ".")
    return open_reference(Path(path), settings)


def _check_outputs(queries: list[QueryFile]) -> None:
    names = {"clusters.tsv", "annotate.png", "annotate.yaml"}
    for q in queries:
        if q.output in names:
            raise UserError(f"The query {q.path} would be written as {q.output}, a name annotate "
                            "uses for its own files. Rename the query file.")


def _pool(settings: AnnotateSettings, queries: list[QueryFile],
          ref: Reference | None) -> tuple[Any, int]:
    """build-context's worker processes for ranking rows (baseline only), when worth it."""
    from cellpuzzle_cli.build_context.build import default_workers, start_pool

    workers = settings.workers or default_workers()
    chunks = sum(-(-q.n_cells // q.chunk_cells) for q in queries if q.in_memory is None)
    if ref is not None and ref.kind == "h5ad":
        chunks += sum(1 for f in ref.files if f.plan.in_memory is None for _ in f.plan.chunks())
    if settings.backend != "baseline" or workers < 2 or chunks < 4:
        return None, 2
    return start_pool(workers), 2 * workers + 2


def _backend(ref: Reference | None, queries: list[QueryFile], settings: AnnotateSettings,
             reference_h5ads: Sequence[Path], pool: Any, depth: int, warnings: list[str],
             progress: Progress | None) -> Backend:
    query_genes = {str(g) for q in queries for g in q.genes}
    if settings.backend == "celltypist":
        from cellpuzzle_cli.annotate.celltypist_backend import CellTypistBackend

        if ref is not None and ref.kind == "h5ad":
            _shared_genes(queries, ref, query_genes, [])
        backend = CellTypistBackend(ref, query_genes, settings, reference_h5ads, warnings,
                                    progress)
        _overlap(queries, query_genes, "the CellTypist model", backend.features,
                 f"{naming(backend.features)} from its feature names", warnings)
        return backend
    from cellpuzzle_cli.annotate.baseline_backend import MarkerBackend

    vocab = _shared_genes(queries, ref, query_genes, warnings)
    return MarkerBackend(ref, vocab, settings, pool, depth, warnings, progress)


def _model_backend(model: TrainedModel, ref: Reference | None, settings: AnnotateSettings,
                   out_dir: Path, trust_remote_code: bool) -> ModelBackend:
    """The candidates the model chooses among: --candidates, else the reference's types, else
    the types of the model's training puzzles; its work folder sits beside the output."""
    known = ref.types if ref is not None else model.types
    types = spelled_as(settings.candidates, known) if settings.candidates else list(known)
    if not types:
        raise UserError(f"The model {model.path} is not one the manifest records as trained by "
                        "cellpuzzle (no sft, merge-lora or rl run made it from training "
                        "puzzles), so its cell types are unknown. Pass --candidates with the "
                        "types to choose from, or --reference with labelled data.")
    work = out_dir.parent / f".{out_dir.name}.votes"
    return ModelBackend(model, types, settings, work, trust_remote_code)


def spelled_as(names: Sequence[str], known: Sequence[str]) -> list[str]:
    """Candidate names as the label policy reads labels (Unicode NFC, invisible characters and
    extra white space gone), each in the spelling of the known type it names (case ignored),
    so the labels written are the reference's (or the model's) own."""
    from cellpuzzle_cli.build_context.label_policy import tidy

    spelling = {type_key(t): t for t in known}
    return [spelling.get(type_key(tidy(n)), tidy(n)) for n in names]


def _votes_warning(backend: ModelBackend) -> list[str]:
    from cellpuzzle_cli.answer import unreadable_warning

    total = backend.answered + backend.unreadable
    warning = unreadable_warning(f"The model {backend.model_label}", total, backend.unreadable,
                                 None)
    return [warning] if warning else []


def _shared_genes(queries: list[QueryFile], ref: Reference, query_genes: set[str],
                  warnings: list[str]) -> Vocabulary:
    shared = _overlap(queries, query_genes, f"the reference {ref.path}", ref.genes,
                      ref.genes_from, warnings)
    return Vocabulary(np.asarray(shared, dtype=object))


def _overlap(queries: list[QueryFile], query_genes: set[str], what: str, genes: np.ndarray,
             described: str, warnings: list[str]) -> list[str]:
    """The gene names query and reference (or model) share, sorted. None is an error; fewer
    than half of the smaller side's genes is a warning, since the labels then rest on a part
    of what was measured (a naming half converted, or version suffixes on one side)."""
    theirs = {str(g) for g in genes}
    shared = sorted(query_genes & theirs)
    q = queries[0]
    sides = (f"the query has {len(query_genes):,} genes ({naming(q.genes)}, from "
             f"{q.genes_from}), {what} {len(theirs):,} ({described.replace(' from ', ', from ')})")
    fix = ("pass --gene-col with the var column that holds gene symbols (CELLxGENE's "
           "feature_name), or convert Ensembl IDs to symbols before annotating")
    if not shared:
        raise UserError(f"The query {q.path} and {what} share no gene name: {sides}. Give both "
                        f"the same naming: {fix}.")
    if len(shared) * 2 < min(len(query_genes), len(theirs)):
        missing = sorted(query_genes - theirs)[:3]
        warnings.append(f"The query and {what} share only {len(shared):,} gene names: {sides}. "
                        f"The labels rest on those genes alone. Query genes {what} lacks: "
                        f"{', '.join(missing)}. If both measured the same genes, {fix}.")
    return shared


def _candidates(backend: Backend, settings: AnnotateSettings,
                ref: Reference | None) -> tuple[list[str], np.ndarray]:
    """Candidate names (as the reference spells them) and their columns in the evidence."""
    index = {type_key(t): i for i, t in enumerate(backend.types)}
    if settings.candidates is None:
        return list(backend.types), np.arange(len(backend.types))
    names = spelled_as(settings.candidates, backend.types)
    missing = [n for n in names if type_key(n) not in index]
    if missing:
        where = f"the reference {ref.path}" if ref is not None else "the CellTypist model"
        raise UserError(f"The candidate '{missing[0]}' is not a cell type of {where} "
                        f"({len(missing)} such). Its types are: {', '.join(backend.types)}. "
                        "Use those names (case is ignored), or add labelled cells of that type "
                        "to the reference.")
    return names, np.asarray([index[type_key(n)] for n in names], dtype=np.int64)


def _annotate_file(q: QueryFile, backend: Backend, names: list[str], columns: np.ndarray,
                   settings: AnnotateSettings, pool: Any, tmp: Path, reference: str,
                   progress: Progress | None) -> tuple[FileResult, list[dict[str, Any]], Any]:
    started = time.perf_counter()
    if q.clusters is not None:
        clustering = given_clusters(q)
        how = f"obs['{settings.cluster_col}']"
    else:
        clustering = cluster_query(q, settings, labelled(progress, f"cluster {q.output}"))
        how = f"Leiden, resolution {clustering.resolution:g}" if clustering.resolution else \
            "one cluster"
    n_clusters = len(clustering.names)
    step = labelled(progress, f"score {q.output}")
    if step:
        step(0, total=q.n_cells)
    evidence = backend.evidence(q, clustering.codes, n_clusters, pool, step)
    empty, silent = _unexpressed(q, evidence, backend)
    prob = evidence.prob if settings.by_cluster else smooth(evidence.prob, clustering,
                                                              settings.smooth_neighbors)
    decision = decide(prob, columns, clustering, settings.by_cluster, settings.one_to_one,
                      settings.min_confidence)
    decision.labels[empty] = -1
    decision.confidence[empty] = 0.0
    notes = list(q.notes) + ([clustering.note] if clustering.note else []) + silent
    label_names, label_codes = _label_codes(decision.labels, names)
    uns = _uns(backend, reference, names, settings, how, notes)
    write_annotated(q.path, tmp / q.output, obs_columns(label_names, label_codes,
                                                        decision.confidence, clustering.names,
                                                        clustering.codes), uns)
    counts = {name: int((label_codes == i).sum()) for i, name in enumerate(label_names)}
    evaluation = _evaluation(q, label_names, label_codes, names)
    mismatch = mismatch_warning(q.output, str(settings.truth_col), evaluation)
    result = FileResult(str(q.path), q.output, q.n_cells, n_clusters,
                        f"{how} ({n_clusters} clusters)", int((decision.labels >= 0).sum()),
                        counts, float(decision.confidence.mean()), notes,
                        time.perf_counter() - started, evaluation,
                        silent + ([mismatch] if mismatch else []))
    table = _cluster_rows(q, clustering, decision, evidence, names, columns)
    return result, table, _panel(q, clustering, decision, names, settings, backend)


def _unexpressed(q: QueryFile, evidence: Evidence, backend: Backend) -> tuple[np.ndarray, list[str]]:
    """Cells with no expressed gene the backend knows: nothing speaks for any type, so they are
    'unassigned' with confidence 0 (their probability goes to "none", for their clusters too)."""
    empty = evidence.empty if evidence.empty is not None else np.zeros(q.n_cells, dtype=bool)
    if not empty.any():
        return empty, []
    evidence.prob[empty] = 0.0
    evidence.prob[empty, -1] = 1.0
    first = int(np.flatnonzero(empty)[0])
    known = "the reference" if backend.name in ("baseline", "celltypist") else "the model"
    note = (f"{q.output}: {int(empty.sum()):,} cells express no gene {known} knows (all-zero "
            f"rows), e.g. row {first} (0-based); they are '{UNASSIGNED}' with confidence 0.")
    return empty, [note]


def _evaluation(q: QueryFile, label_names: list[str], label_codes: np.ndarray,
                names: list[str]) -> dict[str, Any]:
    if q.truth is None:
        return {}
    from cellpuzzle_cli.annotate.evaluate import evaluate

    codes, cats = q.truth
    truth = [str(cats[c]) if c >= 0 else None for c in codes]
    return evaluate(truth, [label_names[c] for c in label_codes], names)


def _label_codes(labels: np.ndarray, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Categories for the label column: the candidates used (in the candidates' order), then
    'unassigned' if any cell is."""
    used = [i for i in range(len(names)) if (labels == i).any()]
    cats = [names[i] for i in used] + ([UNASSIGNED] if (labels < 0).any() else [])
    remap = np.full(len(names) + 1, len(used), dtype=np.int32)
    remap[used] = np.arange(len(used))
    return cats, remap[np.where(labels >= 0, labels, len(names))]


def _uns(backend: Backend, reference: str, names: list[str], settings: AnnotateSettings,
         how: str, notes: list[str]) -> dict[str, Any]:
    """uns['cellpuzzle']: how the labels were made (the reference as it was given)."""
    from cellpuzzle_cli import __version__

    uns = {"backend": backend.name, "model": backend.model_label, "reference": reference,
           "candidates": np.asarray(names, dtype=str), "seed": settings.seed,
           "version": __version__, "label_by": "cluster" if settings.by_cluster else "cell",
           "one_to_one": settings.one_to_one, "min_confidence": settings.min_confidence,
           "clustering": how}
    if notes:
        uns["notes"] = np.asarray(notes, dtype=str)
    return uns


def _cluster_rows(q: QueryFile, clustering: Clustering, decision: Decision, evidence: Evidence,
                  names: list[str], columns: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    sizes = np.bincount(clustering.codes, minlength=len(clustering.names))
    conf = np.bincount(clustering.codes, weights=decision.confidence,
                       minlength=len(clustering.names))
    unassigned = np.bincount(clustering.codes, weights=(decision.labels < 0).astype(float),
                             minlength=len(clustering.names))
    for c, name in enumerate(clustering.names):
        label = int(decision.cluster_labels[c])
        size = max(1, int(sizes[c]))
        if evidence.per_cluster:   # a model's votes: every cell holds the cluster's shares
            first = int(np.flatnonzero(clustering.codes == c)[0])
            weight = evidence.prob[first, columns].astype(float)
        else:                      # cells whose own best is each candidate
            weight = decision.votes[c, :-1].astype(float) / size
        other = weight.copy()
        if label >= 0:
            other[label] = -1
        runner = int(other.argmax()) if other.size else -1
        own = weight[label] if label >= 0 else decision.votes[c, -1] / size
        rows.append({"file": q.output, "cluster": name, "cells": int(sizes[c]),
                     "label": names[label] if label >= 0 else UNASSIGNED,
                     "confidence": float(conf[c] / size), "share": float(own),
                     "runner_up": names[runner] if runner >= 0 and other[runner] > 0 else "",
                     "runner_up_share": float(max(0.0, other[runner])) if runner >= 0 else 0.0,
                     "unassigned_cells": int(unassigned[c]),
                     "markers": evidence.markers(c, int(columns[label])) if label >= 0 else [],
                     "reasoning": (evidence.reasons or {}).get(str(c), "")})
    return rows


def _panel(q: QueryFile, clustering: Clustering, decision: Decision, names: list[str],
           settings: AnnotateSettings, backend: Backend) -> Any:
    if not settings.plot:
        return None
    from cellpuzzle_cli.annotate.embed import plot_positions
    from cellpuzzle_cli.annotate.plot import Panel

    rows, xy, axes = plot_positions(q, clustering, settings)
    labels = np.asarray([names[i] if i >= 0 else UNASSIGNED for i in decision.labels[rows]],
                        dtype=object)
    title = (f"{q.output}: {backend.name}, {q.n_cells:,} cells"
             + (f" ({rows.size:,} drawn)" if rows.size < q.n_cells else ""))
    return Panel(title, xy, labels, decision.confidence[rows], axes)
