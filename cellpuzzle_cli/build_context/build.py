"""build-context's orchestration: plan every file, run the top-k chunks, write the tables."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.build_context.fields import (
    load_context_fields,
)
from cellpuzzle_cli.build_context.label_policy import load_renames, merge_case_variants
from cellpuzzle_cli.build_context.labels import is_resolved_note
from cellpuzzle_cli.build_context.plan import (
    FilePlan,
    FileReport,
    check_unique_outputs,
    count_groups,
    plan_file,
)
from cellpuzzle_cli.build_context.rows import ChunkStats, _inflater, close_cached_files, topk_task
from cellpuzzle_cli.build_context.settings import ContextSettings
from cellpuzzle_cli.build_context.table import TableWriter
from cellpuzzle_cli.build_context.values import PROBE_ROWS
from cellpuzzle_cli.config import check_settings, save_settings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, atomic_output_dir, find_files

_EARLY_POOL_BYTES = 64 << 20        # inputs this big start worker processes before planning


@dataclass
class BuildResult:
    """What one build-context run wrote (the CLI turns it into a table)."""

    out_dir: Path
    files: list[FileReport]
    seconds: float
    workers: int

    @property
    def cells(self) -> int:
        return sum(f.cells_kept for f in self.files)

    @property
    def warnings(self) -> list[str]:
        return [f"{f.output}: {w}" for f in self.files for w in f.warnings]

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps beside the settings: per-file counts, no timings."""
        return {"files": [{k: v for k, v in asdict(r).items() if k not in ("seconds", "input")}
                          for r in self.files]}


def ordered_results(jobs: Iterable[tuple[Any, bool, Callable, tuple]], pool: Any,
             depth: int) -> Iterator[tuple[Any, Any]]:
    """Run jobs (in the pool unless marked local) and yield (tag, result) in submission order."""
    from concurrent.futures import Future

    pending: deque = deque()
    for tag, local, fn, args in jobs:
        if pool is None or local:
            fut: Future = Future()
            fut.set_result(fn(*args))
        else:
            fut = pool.submit(fn, *args)
        pending.append((tag, fut))
        if len(pending) >= depth:
            tag0, fut0 = pending.popleft()
            yield tag0, fut0.result()
    while pending:
        tag0, fut0 = pending.popleft()
        yield tag0, fut0.result()


def start_pool(workers: int):
    """Worker processes, started at once (each imports numpy and h5py before the first task)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: fresh interpreters, no inherited HDF5 state or threads
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    for _ in range(workers):
        pool.submit(_warm)
    return pool


def _warm() -> int:
    """A no-op task: unpickling it imports this module (numpy, h5py) in the worker."""
    _inflater()
    return os.getpid()


def _find_h5ad(inputs: list[Path]) -> list[tuple[Path, Path]]:
    files = find_files(inputs, (".h5ad",), "input")
    if not files:
        raise UserError(f"No .h5ad files found in {', '.join(str(p) for p in inputs)}. Point "
                        "build-context at .h5ad files or folders that contain them.")
    return files


def h5ad_inputs(inputs: list[Path]) -> list[Path]:
    """The .h5ad files build-context would read from `inputs` (files and folders)."""
    return [path for path, _ in _find_h5ad(inputs)]


def build_context(inputs: list[Path], out_dir: Path, config: ContextSettings | None = None,
                  overwrite: bool = False, progress: Progress | None = None) -> BuildResult:
    """Write one Parquet cell table per input `.h5ad` under `out_dir`, mirroring input folders."""
    started = time.perf_counter()
    config = check_settings(config or ContextSettings())
    fields = load_context_fields(config.context_config)
    files = _find_h5ad(inputs)
    field_columns = fields.columns()
    renames = load_renames(config.rename, config.label_map)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        # big inputs: start the workers now, so their start-up overlaps reading metadata
        early = sum(path.stat().st_size for path, _ in files) > _EARLY_POOL_BYTES
        wanted = config.workers or default_workers()
        pool = start_pool(wanted) if wanted > 1 and early else None
        workers = wanted if pool is not None else 1
        try:
            used: set[str] = set()
            plans = [plan_file(path, root, config, fields, tmp, renames, used)
                     for path, root in files]
            check_unique_outputs(plans)
            _one_spelling_per_type(plans)
            unused = sorted(set(renames) - used)
            if unused:
                plans[0].report.warnings.append(
                    f"{len(unused)} rename(s) matched no cell type: "
                    f"{', '.join(repr(u) for u in unused[:5])}. Check their spelling.")
            if progress:
                progress(0, total=sum(p.kept.size for p in plans), description="build-context")
            chunks = sum(1 for p in plans if p.in_memory is None for _ in p.chunks())
            if pool is None and min(wanted, chunks) > 1:
                workers = min(wanted, chunks)
                pool = start_pool(workers)
            _say_once(plans)
            _run(plans, field_columns, config.top_genes, pool, 2 * workers + 2, progress)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            close_cached_files()
        reports = [p.report for p in plans]
        save_settings(tmp, "build-context", config)
    return BuildResult(Path(out_dir), reports, time.perf_counter() - started, workers)


def _one_spelling_per_type(plans: list[FilePlan]) -> None:
    """Cell types equal but for case become one, across all files (see label_policy)."""
    columns, notes = merge_case_variants([p.cell_type for p in plans])
    for plan, column, file_notes in zip(plans, columns, notes):
        if file_notes:
            plan.cell_type = column
            plan.report.warnings.extend(file_notes)
            count_groups(plan)


@dataclass
class _Tally:
    """One file's chunk statistics, summed in row order."""

    negatives: int = 0
    nonfinite: int = 0
    nonfinite_cell: str = ""
    empty: list[np.ndarray] = field(default_factory=list)   # kept rows with no expressed gene

    def add(self, plan: FilePlan, a: int, lengths: np.ndarray, stats: ChunkStats) -> None:
        self.negatives += stats.negatives
        if stats.nonfinite and not self.nonfinite:
            self.nonfinite_cell = str(plan.cell_ids[a + stats.first_nonfinite])
        self.nonfinite += stats.nonfinite
        if not lengths.all():
            self.empty.append(a + np.flatnonzero(lengths == 0))

    def finish(self, plan: FilePlan) -> None:
        """Refuse non-finite values; count the cells left out for having no expressed gene."""
        report, label = plan.report, plan.matrix.label
        if self.nonfinite:
            raise UserError(f"{report.input}: {label} holds {self.nonfinite} non-finite values "
                            f"(NaN or infinite), e.g. in cell '{self.nonfinite_cell}'; genes "
                            "cannot be ranked by them. Replace them in the file (with 0 where "
                            "they mean no expression) or recompute the matrix, and try again.")
        if self.negatives:
            report.warnings.append(f"{self.negatives} negative values in {label} beyond the "
                                   f"first {PROBE_ROWS} rows were treated as not expressed.")
        if self.empty:
            empty = np.concatenate(self.empty)
            report.dropped_no_expression = int(empty.size)
            report.cells_kept -= int(empty.size)
            if report.cells_kept == 0:
                raise UserError(f"{report.input}: none of its {empty.size} cells has an expressed "
                                f"gene in {label} (all rows are zero). Check that the file holds "
                                "expression values, or leave it out.")
            keep = np.ones(plan.kept.size, dtype=bool)
            keep[empty] = False
            count_groups(plan, keep)
            report.warnings.append(f"{empty.size} cells with no expressed gene in {label} "
                                   f"(all-zero rows) were left out, e.g. cell "
                                   f"'{plan.cell_ids[empty[0]]}'.")


def _run(plans: list[FilePlan], field_columns: list[str], k: int, pool: Any, depth: int,
         progress: Progress | None) -> None:
    def jobs():
        for i, plan in enumerate(plans):
            for a, b in plan.chunks():
                # an in-memory (CSC) matrix would be pickled per task: compute those here
                yield ((i, a, b), plan.in_memory is not None, topk_task,
                       (plan.matrix, plan.kept[a:b], k, plan.in_memory))

    with_ids = any(p.cell_type_ids is not None for p in plans)
    writers: dict[int, TableWriter] = {}
    tallies: dict[int, _Tally] = {}
    last_done = time.perf_counter()   # files finish in order: a file's time is since the last
    try:
        for (i, a, b), (lengths, genes, stats) in ordered_results(jobs(), pool, depth):
            plan = plans[i]
            if i not in writers:
                writers[i] = TableWriter(plan, field_columns, with_ids)
            writers[i].write(a, b, lengths, genes)
            tallies.setdefault(i, _Tally()).add(plan, a, lengths, stats)
            if progress:
                progress(b - a)
            if b == plan.kept.size:
                writers.pop(i).close()
                tallies.pop(i).finish(plan)
                now = time.perf_counter()
                plan.report.seconds, last_done = now - last_done, now
    finally:
        for w in writers.values():
            w.close()


def _say_once(plans: list[FilePlan]) -> None:
    """A note several files share (labels read from ontologies) stays on the first file only."""
    seen: set[str] = set()
    for plan in plans:
        kept = []
        for note in plan.report.warnings:
            if is_resolved_note(note):
                if note in seen:
                    continue
                seen.add(note)
            kept.append(note)
        plan.report.warnings[:] = kept


def default_workers() -> int:
    """One worker per CPU core, at most 8 (the main process writes Parquet alone)."""
    return max(1, min(8, os.cpu_count() or 1))
