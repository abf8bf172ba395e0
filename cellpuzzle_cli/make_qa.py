"""make-qa: CellPuzzles from the per-cell tables that build-context writes.

A puzzle is N cells from one group — (dataset, donor) or, where build-context recorded a
batch, (dataset, donor, batch) — each of a different cell type, with those N types as the
candidates (plus up to ``extra_candidates`` absent types: open-set puzzles, see `open_set`).
Per group and per N (``min_n``..``max_n``) up to ``per_n`` puzzles are drawn: N types uniformly
without replacement (their draw order is the cell order), then one cell uniformly from each
type's pool. An N that no group has enough types for yields no puzzle and a warning.

Choices worth knowing:

* ``per_n`` defaults to 20 puzzles per N per group. The donor is the unit a fair split holds
  out, so hundreds of puzzles from one donor add little that 20 do not, while a collection of
  100 donors still yields ~26,000 puzzles (13 sizes × 20 × 100) — well above Cell-o1's set.
  Single-donor data wants more (e.g. ``--per-n 100``).
* No two puzzles of a group use the same *set* of cells (order ignored); groups never share
  cells, so puzzles are distinct overall. When a group cannot offer ``per_n`` distinct sets
  (few cells per type) it makes what it can and the shortfall is reported, never padded.
* Each (group, N) draws from its own generator seeded by (seed, group, N), so adding a donor
  or changing ``max_n`` leaves every other group's puzzles byte-identical.
* Cells are indexed by (group, type) once with one pandas groupby, and top genes stay in
  Arrow until a cell is actually used: sampling does no per-puzzle scans, so a 100k-cell
  group costs the same per puzzle as a 100-cell one.
* The context paragraph is the one the puzzle's cells share; if they differ (a donor sampled
  in two tissues) the most common one among them is used and the puzzle is counted as mixed.
* ``test_cells`` (single-donor data): a split by cell can only keep puzzles that use no cell of
  a test puzzle, and random puzzles from a small pool nearly all touch one (a type with 8
  cells sits in every large puzzle). So, when asked, each group's cells of every type are
  divided up front — that fraction (at least one cell, never all) into a "test" fold — and
  puzzles are drawn within one fold, tagged ``cell_fold``; ``per_n`` is shared between the
  folds in the same proportion. ``split --group-by cell`` then loses no puzzle to leakage.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.answer import format_answer
from cellpuzzle_cli.cell_tables import Cells, find_cell_files, load_cells
from cellpuzzle_cli.config import Count, NonNegative, Seed, check_settings, save_settings
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, atomic_output_dir, write_jsonl
from cellpuzzle_cli.open_set import add_extras, group_pools
from cellpuzzle_cli.prompts import format_question

if TYPE_CHECKING:  # numpy is imported where it is used, so the CLI starts without it
    import numpy as np

    from cellpuzzle_cli.runner import Job
PUZZLES_FILE = "puzzles.jsonl"
IDS_FIELD = "cell_type_ids"                  # the puzzle's gold term IDs, in cell order
_MAX_ATTEMPTS_PER_PUZZLE = 20


@dataclass(frozen=True)
class MakeQaSettings:
    """Everything that decides which puzzles come out (written beside them)."""

    min_n: int = 3
    max_n: int = 15
    per_n: Count = 20
    seed: Seed = 0
    sort_candidates: bool = False
    ignore_batch: bool = False
    test_cells: float = 0.0
    extra_candidates: NonNegative = 0   # K absent types added to each puzzle's candidates

    def validate(self) -> None:
        if self.min_n < 2:
            raise UserError(f"--min-n is {self.min_n}; a puzzle needs at least 2 cells. "
                            "Use --min-n 2 or more (Cell-o1 style puzzles start at 3).")
        if self.max_n < self.min_n:
            raise UserError(f"--max-n ({self.max_n}) is smaller than --min-n ({self.min_n}). "
                            "Raise --max-n or lower --min-n.")
        if not 0 <= self.test_cells < 1:
            raise UserError(f"--test-cells is {self.test_cells}; give a fraction in [0, 1), "
                            "e.g. 0.2 (0 turns cell folds off).")
        if self.test_cells and self.per_n < 2:
            raise UserError("--test-cells needs --per-n 2 or more, so both folds get puzzles.")

    def fold_quota(self, fold: str | None) -> int:
        """Puzzles per N for one fold: `per_n` shared in proportion to `test_cells`."""
        if fold is None:
            return self.per_n
        test = min(self.per_n - 1, max(1, round(self.per_n * self.test_cells)))
        return test if fold == "test" else self.per_n - test


@dataclass
class Group:
    """One donor (or donor/batch) with its cells indexed by type once."""

    dataset: str
    donor_id: str
    batch_id: str | None
    types: list[str]  # sorted
    pools: list[np.ndarray]  # row indices per type, aligned with `types`
    fold: str | None = None  # "train"/"test" with --test-cells

    @property
    def label(self) -> str:
        return self.donor_id if self.batch_id is None else f"{self.donor_id}/{self.batch_id}"

    @property
    def name(self) -> str:
        """Unique over groups and folds; seeds the group's generators and prefixes puzzle ids."""
        base = f"{self.dataset}:{self.label}"
        return base if self.fold is None else f"{base}:{self.fold}"


def split_cell_folds(group: Group, fraction: float, seed: int) -> list[Group]:
    """The group's cells of each type divided into a train and a test fold (see module doc).

    Types with a single cell stay in train only; each fold keeps only its non-empty types.
    """
    import numpy as np

    rng = seeded_rng(seed, group.dataset, group.label, "folds")
    folds = {f: Group(group.dataset, group.donor_id, group.batch_id, [], [], f)
             for f in ("train", "test")}
    for cell_type, pool in zip(group.types, group.pools):
        shuffled = pool[rng.permutation(len(pool))]
        k = min(len(pool) - 1, max(1, round(fraction * len(pool))))
        for fold, part in (("test", np.sort(shuffled[:k])), ("train", np.sort(shuffled[k:]))):
            if len(part):
                folds[fold].types.append(cell_type)
                folds[fold].pools.append(part)
    return [folds["train"], folds["test"]]


@dataclass
class MakeQAResult:
    out_dir: Path
    puzzles_path: Path
    n_files: int
    n_cells: int
    groups_used: int
    groups_skipped: int
    skipped_examples: list[str]
    puzzles_per_n: dict[int, int]
    groups_per_n: dict[int, int]
    short_per_n: dict[int, int]
    mixed_context: int
    per_fold: dict[str, int] = field(default_factory=dict)  # "all" or "train"/"test"
    extra_short: int = 0  # puzzles given fewer than `extra_candidates` extra candidates
    warnings: list[str] = field(default_factory=list)

    @property
    def n_puzzles(self) -> int:
        return sum(self.puzzles_per_n.values())

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps about the run beside its settings."""
        return {"files": self.n_files, "cells": self.n_cells, "groups_used": self.groups_used,
                "groups_skipped": self.groups_skipped, "puzzles": self.n_puzzles,
                "puzzles_per_n": self.puzzles_per_n, "short_per_n": self.short_per_n,
                "mixed_context": self.mixed_context, "per_fold": self.per_fold,
                "extra_short": self.extra_short, "warnings": self.warnings}


# -- reading ---------------------------------------------------------------------------------
def index_groups(cells: Cells, use_batch: bool = True) -> list[Group]:
    """Group rows by (dataset, donor[, batch], type) once; groups sorted by key."""
    import numpy as np

    meta = cells.meta
    batch = meta["batch_id"] if use_batch else None
    has_batch = batch.notna() if batch is not None else None
    keys = meta[["dataset", "donor_id"]].copy()
    # "" never collides with a real batch because it cannot come with has_batch == True.
    keys["batch"] = batch.where(has_batch, "") if batch is not None else ""
    keys["has_batch"] = has_batch if has_batch is not None else False
    keys["cell_type"] = meta["cell_type"]
    indices = keys.groupby(["dataset", "donor_id", "has_batch", "batch", "cell_type"],
                           sort=True).indices
    groups: dict[tuple, Group] = {}
    for (dataset, donor, flag, batch_id, cell_type), rows in indices.items():
        key = (dataset, donor, bool(flag), batch_id)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(dataset, donor, batch_id if flag else None, [], [])
        g.types.append(cell_type)
        g.pools.append(np.asarray(rows, dtype=np.int64))
    return [groups[k] for k in sorted(groups)]


# -- sampling --------------------------------------------------------------------------------
def stable_int(*parts: object) -> int:
    """A 64-bit number from text parts, the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def seeded_rng(seed: int, *parts: object) -> np.random.Generator:
    """An independent generator per (seed, parts): draws for one group never shift another's."""
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence([seed, stable_int(*parts)]))


def count_cell_sets(pool_sizes: list[int], n: int) -> int:
    """How many distinct puzzles of size n a group allows: e_n(pool sizes), exactly."""
    e = [1] + [0] * n
    for s in pool_sizes:
        for j in range(n, 0, -1):
            e[j] += e[j - 1] * s
    return e[n]


def sample_group(group: Group, n: int, quota: int,
                 seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to `quota` distinct cell sets of size n: (row indices in cell order, a permutation
    for shuffling the candidates — drawn even when they get sorted, so sorting never changes
    which cells are picked)."""
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, stable_int(group.name), n]))
    sizes = np.array([len(p) for p in group.pools], dtype=np.int64)
    target = min(quota, count_cell_sets(sizes.tolist(), n))
    seen: set[tuple[int, ...]] = set()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(_MAX_ATTEMPTS_PER_PUZZLE * target + 100):
        if len(out) >= target:
            break
        chosen = rng.choice(len(sizes), size=n, replace=False)
        picks = rng.integers(0, sizes[chosen])
        rows = np.array([group.pools[t][i] for t, i in zip(chosen, picks)], dtype=np.int64)
        key = tuple(sorted(rows.tolist()))
        if key not in seen:
            seen.add(key)
            out.append((rows, rng.permutation(n)))
    return out


def _context(codes: np.ndarray, contexts: np.ndarray) -> tuple[str, bool]:
    """The shared context of the cells, or the most common one (first seen wins ties)."""
    import numpy as np

    values, first, counts = np.unique(codes, return_index=True, return_counts=True)
    if len(values) == 1:
        return str(contexts[values[0]]), False
    best = max(range(len(values)), key=lambda i: (counts[i], -first[i]))
    return str(contexts[values[best]]), True


def _term(value: Any) -> str | None:
    import pandas as pd

    return None if pd.isna(value) else str(value)


def build_group_puzzles(cells: Cells, group: Group, config: MakeQaSettings,
                        context_codes: np.ndarray, contexts: np.ndarray, stats: dict[str, Counter],
                        pools: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """Every puzzle of one group, as records; extra candidates come from `pools`."""
    import numpy as np
    import pyarrow as pa

    samples: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    for n in range(config.min_n, min(config.max_n, len(group.types)) + 1):
        quota = config.fold_quota(group.fold)
        sets = sample_group(group, n, quota, config.seed)
        stats["groups_per_n"][n] += group.fold != "test"  # count a group once, not per fold
        stats["short_per_n"][n] += quota - len(sets)
        samples.extend((n, k, rows, perm) for k, (rows, perm) in enumerate(sets))
    if not samples:
        return []
    used = np.unique(np.concatenate([s[2] for s in samples]))
    genes = dict(zip(used.tolist(), cells.genes.take(pa.array(used)).to_pylist()))
    records = []
    for n, k, rows, perm in samples:
        answer_types = [str(cells.types[r]) for r in rows]
        candidates, added = [answer_types[i] for i in perm], 0
        if pools:
            candidates, added = add_extras(candidates, pools, config.extra_candidates,
                                           seeded_rng(config.seed, group.name, n, k, "extras"))
        stats["extra_short"][0] += added < config.extra_candidates
        if config.sort_candidates:
            candidates = sorted(candidates)
        context, mixed = _context(context_codes[rows], contexts)
        stats["mixed"][0] += mixed
        stats["puzzles_per_n"][n] += 1
        stats["folds"][group.fold or "all"] += 1
        records.append({
            "puzzle_id": f"{group.name}:n{n:02d}:{k:04d}",
            "dataset": group.dataset,
            "group": group.label,
            "donor_id": group.donor_id,
            "n": n,
            "cell_ids": [str(cells.cell_ids[r]) for r in rows],
            "question": format_question(context, [genes[r] or [] for r in rows.tolist()],
                                        candidates),
            "answer": format_answer(answer_types),
            "candidates": candidates,
            **({"cell_fold": group.fold} if group.fold else {}),
            **({IDS_FIELD: [_term(cells.terms[r]) for r in rows]}
               if cells.terms is not None else {}),
        })
    return records


def run_warnings(config: MakeQaSettings, stats: dict[str, Counter], most_types: int,
                 n_puzzles: int) -> list[str]:
    """Each requested N that gave no puzzle, and puzzles short of extra candidates."""
    out = [f"N={n}: no puzzle, because no group has {n} distinct cell types (the most any has "
           f"is {most_types}); lower --max-n to {most_types}."
           for n in range(config.min_n, config.max_n + 1) if not stats["puzzles_per_n"][n]]
    short = stats["extra_short"][0]
    if short:
        out.append(f"{short} of {n_puzzles} puzzles got fewer than --extra-candidates "
                   f"{config.extra_candidates} extra candidates: their group and dataset have "
                   "too few other cell types.")
    return out


def make_puzzles(cells_path: Path, out_dir: Path, config: MakeQaSettings = MakeQaSettings(),
                 overwrite: bool = False, progress: Progress | None = None) -> MakeQAResult:
    """Read the cell tables, sample puzzles per group and write `puzzles.jsonl` atomically."""
    import numpy as np
    import pandas as pd

    check_settings(config)
    files = find_cell_files(cells_path)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        cells = load_cells(files)
        codes, contexts = pd.factorize(cells.meta["context"], sort=False)
        contexts = np.asarray(contexts, dtype=object)
        groups = index_groups(cells, not config.ignore_batch)
        stats: dict[str, Counter] = {k: Counter() for k in
                                     ("groups_per_n", "short_per_n", "puzzles_per_n", "mixed",
                                      "folds", "extra_short")}
        if progress:
            progress(0, total=len(groups), description="Sampling puzzles")
        records: list[dict[str, Any]] = []
        skipped: list[str] = []
        pools = group_pools(groups) if config.extra_candidates else {}
        for group in groups:
            if progress:
                progress(1)
            if len(group.types) < config.min_n:
                skipped.append(f"{group.name} ({len(group.types)} types)")
                continue
            parts = (split_cell_folds(group, config.test_cells, config.seed)
                     if config.test_cells else [group])
            for part in parts:
                records.extend(build_group_puzzles(cells, part, config, codes, contexts, stats,
                                                   pools.get(group.name)))
        if not records:
            raise UserError(f"No puzzles could be made: none of the {len(groups)} group(s) in "
                            f"{cells_path} has at least --min-n {config.min_n} distinct cell "
                            "types. Lower --min-n, or give make-qa data with more cell types "
                            "per donor.")
        ids = [r["puzzle_id"] for r in records]
        if len(set(ids)) != len(ids):
            raise RuntimeError("puzzle ids collide; dataset or donor names contain ':'")
        result = MakeQAResult(
            out_dir=out_dir, puzzles_path=out_dir / PUZZLES_FILE, n_files=len(files),
            n_cells=len(cells.meta), groups_used=len(groups) - len(skipped),
            groups_skipped=len(skipped), skipped_examples=skipped[:5],
            puzzles_per_n=dict(sorted(stats["puzzles_per_n"].items())),
            groups_per_n=dict(sorted(stats["groups_per_n"].items())),
            short_per_n={n: c for n, c in sorted(stats["short_per_n"].items()) if c},
            mixed_context=stats["mixed"][0], per_fold=dict(sorted(stats["folds"].items())),
            extra_short=stats["extra_short"][0],
            warnings=run_warnings(config, stats, max(len(g.types) for g in groups),
                                  len(records)))
        write_jsonl(tmp / PUZZLES_FILE, records)
        save_settings(tmp, "make-qa", config)
    return result


def step(job: Job, progress: Progress) -> MakeQAResult:
    """make-qa as a pipeline step (see `runner`)."""
    return make_puzzles(job.inputs["cells"], job.output, job.settings, overwrite=job.overwrite,
                        progress=progress)
