"""split: leakage-free, N-stratified train/test split of make-qa puzzles.

The unit that must not straddle the split is chosen with ``group_by``:

* ``donor`` (default) / ``dataset``: units are (dataset, donor_id) pairs / datasets. The test
  size aimed for is ``min(max_test, round(test_fraction × puzzles))``. Units are sorted, shuffled
  with the seed, and moved whole into test until test reaches that size (at least one unit
  always stays in train). Whole units rarely land exactly on the target; if test then holds
  more than ``max_test`` puzzles it is cut down by a stratified-by-N sample, and the puzzles cut
  are *dropped*, not moved to train — their donor is already in test, so they would leak.
  Because every group gets the same quota per N, moving whole units keeps N roughly stratified.
* ``cell`` (single-donor data), puzzles made with ``make-qa --test-cells``: each carries a
  ``cell_fold`` and the folds use disjoint cells, so the test fold is test (cut to ``max_test``
  stratified by N; cut puzzles are dropped) and the train fold is train; nothing is lost to
  leakage and ``test_fraction`` is not used (``--test-cells`` chose the size).
* ``cell`` without folds: the test size is allotted across N in proportion to the puzzles
  of each N (largest remainder), so test is stratified exactly. Test puzzles are picked from the
  largest N down, each time the one sharing the most cells with the puzzles already in test
  (seeded tie-break): this keeps the test cells few, so few train puzzles are lost. Every other
  puzzle sharing no cell with test goes to train; the rest would leak a cell and are dropped.

Donors, datasets and cells shared between the written splits are counted from the outputs
themselves; a split whose unit leaks is a bug and raises. A split that is leak-free but misleads
(test asks for an N or a cell type training never shows, or test outweighs train) is written
with warnings, kept in the result's summary and so in the manifest. Records keep the published
CellPuzzles field names (``system_msg``, ``user_msg``, ``assistant_msg``) with the plain answer
``"t1 | t2 | …"`` as ``assistant_msg``; training steps add their own ``<think>/<answer>`` layout.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from cellpuzzle_cli.config import Count, Seed, check_settings, one_of, save_settings
from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.io import (
    Progress,
    atomic_output_dir,
    check_unique_ids,
    read_records,
    write_jsonl,
)
from cellpuzzle_cli.make_qa import IDS_FIELD, PUZZLES_FILE, seeded_rng
from cellpuzzle_cli.prompts import (
    load_system_prompt,
    record_candidates,
    system_prompt,
)

if TYPE_CHECKING:  # numpy is imported where it is used, so the CLI starts without it
    import numpy as np

    from cellpuzzle_cli.runner import Job

GROUP_BY = ("donor", "dataset", "cell")
TRAIN_FILE = "train.jsonl"
TEST_FILE = "test.jsonl"
REQUIRED_FIELDS = ("puzzle_id", "dataset", "group", "donor_id", "n", "cell_ids", "question",
                   "answer")



@dataclass(frozen=True)
class SplitSettings:
    """Everything that decides which puzzles go to test (saved as split.yaml)."""

    group_by: Annotated[str, one_of(*GROUP_BY)] = "donor"
    test_fraction: float = 0.2
    max_test: Count = 1100
    seed: Seed = 0
    system_prompt_file: Path | None = None

    def validate(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise UserError(f"--test-fraction is {self.test_fraction}; give a fraction between "
                            "0 and 1, e.g. 0.2.")


@dataclass
class Assignment:
    """Indices into the puzzle list: test, train, and those dropped to prevent leakage."""

    test: list[int]
    train: list[int]
    dropped_leak: list[int] = field(default_factory=list)  # share a cell with test (cell mode)
    dropped_cap: list[int] = field(default_factory=list)  # cut from test by --max-test
    method: str = "whole units"


@dataclass
class SplitResult:
    out_dir: Path
    train_path: Path
    test_path: Path
    group_by: str
    per_n: dict[int, dict[str, int]]  # n -> {"train", "test", "dropped_leak", "dropped_cap"}
    counts: dict[str, dict[str, int]]  # "train"/"test"/"shared" -> datasets, donors, cells
    method: str = ""
    warnings: list[str] = field(default_factory=list)

    def total(self, column: str) -> int:
        return sum(row[column] for row in self.per_n.values())

    def summary(self) -> dict[str, Any]:
        """What the manifest keeps about the run beside its settings."""
        return {"puzzles": {c: self.total(c) for c in ("train", "test", "dropped_leak",
                                                      "dropped_cap")},
                "method": self.method, "distinct": self.counts, "per_n": self.per_n,
                "warnings": self.warnings}


# -- reading ---------------------------------------------------------------------------------
def resolve_puzzles_path(path: Path) -> Path:
    """A puzzles file, or the make-qa folder holding `puzzles.jsonl`."""
    path = existing_path(path, "puzzles input")
    if path.is_dir():
        inner = path / PUZZLES_FILE
        if not inner.is_file():
            raise UserError(f"{path} holds no {PUZZLES_FILE}. Give the output folder of "
                            "`cellpuzzle make-qa` or a puzzles .jsonl file.")
        return inner
    return path


def load_puzzles(path: Path) -> list[dict[str, Any]]:
    records = read_records(path)
    if not records:
        raise UserError(f"{path} holds no puzzles. Re-run `cellpuzzle make-qa`.")
    for i, rec in enumerate(records):
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        if missing:
            hint = (" It looks like a train/test file already written by split."
                    if "user_msg" in rec else "")
            raise UserError(f"Puzzle {i + 1} of {path} lacks the field(s) {', '.join(missing)}."
                            f"{hint} split needs the puzzles.jsonl written by `cellpuzzle "
                            "make-qa` (it carries the cell and donor ids a leakage-free split "
                            "needs).")
    check_unique_ids((r["puzzle_id"] for r in records), path, "Regenerate it with `cellpuzzle "
                     "make-qa` instead of concatenating puzzle files.")
    return records


# -- assignment ------------------------------------------------------------------------------
def allocate(sizes: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` across strata in proportion to `sizes` (largest remainder; small N wins ties)."""
    whole = sum(sizes.values())
    total = min(total, whole)
    exact = {k: total * v / whole for k, v in sizes.items()}
    out = {k: int(x) for k, x in exact.items()}
    left = total - sum(out.values())
    for k in sorted(sizes, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def stratified_subsample(indices: list[int], ns: list[int], total: int,
                         rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Keep `total` of `indices` stratified by N; returns (kept, removed), each sorted."""
    strata: dict[int, list[int]] = {}
    for i in indices:
        strata.setdefault(ns[i], []).append(i)
    quota = allocate({n: len(v) for n, v in strata.items()}, total)
    kept: list[int] = []
    for n in sorted(strata):
        members = strata[n]
        kept.extend(members[j] for j in rng.permutation(len(members))[:quota[n]])
    kept_set = set(kept)
    return sorted(kept), sorted(i for i in indices if i not in kept_set)


def assign_by_unit(units: list[Any], ns: list[int], config: SplitSettings) -> Assignment:
    """Whole units (donors or datasets) to test until the target size; see the module docstring."""
    members: dict[Any, list[int]] = {}
    for i, u in enumerate(units):
        members.setdefault(u, []).append(i)
    keys = sorted(members)
    if len(keys) < 2:
        what = "donor" if config.group_by == "donor" else "dataset"
        name = " of ".join(keys[0][::-1]) if isinstance(keys[0], tuple) else keys[0]
        alt = "--group-by cell" if what == "donor" else "--group-by donor or --group-by cell"
        raise UserError(f"All puzzles come from one {what} ({name}), so --group-by "
                        f"{config.group_by} cannot hold any {what} out for testing. Use {alt} "
                        "(no cell of a test puzzle appears in train), ideally with puzzles made "
                        "by `make-qa --test-cells 0.2` so no puzzle is lost to the split.")
    target = min(config.max_test, max(1, round(config.test_fraction * len(units))))
    rng = seeded_rng(config.seed, "split", config.group_by)
    test_units: list[Any] = []
    count = 0
    for j in rng.permutation(len(keys)):
        if count >= target or len(test_units) == len(keys) - 1:
            break
        test_units.append(keys[j])
        count += len(members[keys[j]])
    test = sorted(i for u in test_units for i in members[u])
    dropped_cap: list[int] = []
    if len(test) > config.max_test:
        test, dropped_cap = stratified_subsample(test, ns, config.max_test, rng)
    chosen = set(test_units)
    train = [i for i, u in enumerate(units) if u not in chosen]
    return Assignment(test=test, train=train, dropped_cap=dropped_cap)


def assign_by_cell(cells: list[list[Any]], ns: list[int], config: SplitSettings) -> Assignment:
    """Test puzzles that reuse each other's cells; train = puzzles sharing no cell with test."""
    import numpy as np

    cell_index: dict[Any, int] = {}
    puzzle_cells = [np.array([cell_index.setdefault(c, len(cell_index)) for c in cs],
                             dtype=np.int64) for cs in cells]
    n_puzzles = len(cells)
    # Inverted index cell -> puzzles, as CSR arrays.
    flat = np.concatenate(puzzle_cells) if puzzle_cells else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(n_puzzles), [len(p) for p in puzzle_cells])
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(len(cell_index) + 1))
    by_cell = owner[order]

    overlap = np.zeros(n_puzzles, dtype=np.int64)
    in_test_cell = np.zeros(len(cell_index), dtype=bool)
    ns_arr = np.asarray(ns)
    target = min(config.max_test, max(1, round(config.test_fraction * n_puzzles)))
    strata = {n: np.flatnonzero(ns_arr == n) for n in sorted(set(ns))}
    quota = allocate({n: len(v) for n, v in strata.items()}, target)
    rng = seeded_rng(config.seed, "split", "cell")
    test: list[int] = []
    for n in sorted(strata, reverse=True):
        members = strata[n]
        tie = rng.permutation(len(members))  # smaller wins among equal overlap
        available = np.ones(len(members), dtype=bool)
        for _ in range(quota[n]):
            score = np.where(available, overlap[members] * (len(members) + 1) - tie, -1 << 62)
            k = int(np.argmax(score))
            available[k] = False
            p = int(members[k])
            test.append(p)
            for c in puzzle_cells[p]:
                if not in_test_cell[c]:
                    in_test_cell[c] = True
                    overlap[by_cell[starts[c]:starts[c + 1]]] += 1
    test_set = set(test)
    rest = [i for i in range(n_puzzles) if i not in test_set]
    train = [i for i in rest if overlap[i] == 0]
    dropped = [i for i in rest if overlap[i] > 0]
    return Assignment(test=sorted(test), train=train, dropped_leak=dropped,
                      method="test puzzles chosen to share cells; train drops any that touch them")


def assign_by_fold(folds: list[str], ns: list[int], config: SplitSettings) -> Assignment:
    """make-qa already drew train and test puzzles from disjoint cells; honour that."""
    odd = sorted(set(folds) - {"train", "test"})
    if odd:
        raise UserError(f"Unknown cell_fold value(s) {', '.join(odd)} in the puzzles; make-qa "
                        "writes only 'train' and 'test'. Regenerate them with make-qa.")
    test = [i for i, f in enumerate(folds) if f == "test"]
    train = [i for i, f in enumerate(folds) if f == "train"]
    if not test:
        raise UserError("The puzzles carry cell folds but none is in the test fold (too few "
                        "cells per type). Re-run make-qa with a larger --test-cells or --per-n.")
    dropped_cap: list[int] = []
    if len(test) > config.max_test:
        test, dropped_cap = stratified_subsample(test, ns, config.max_test,
                                                 seeded_rng(config.seed, "split", "fold"))
    return Assignment(test=test, train=train, dropped_cap=dropped_cap,
                      method="cell folds from make-qa --test-cells")


def assign(puzzles: list[dict[str, Any]], config: SplitSettings) -> Assignment:
    ns = [int(p["n"]) for p in puzzles]
    if config.group_by == "cell" and all(p.get("cell_fold") for p in puzzles):
        return assign_by_fold([p["cell_fold"] for p in puzzles], ns, config)
    if config.group_by == "cell":
        return assign_by_cell([[(p["dataset"], c) for c in p["cell_ids"]] for p in puzzles],
                              ns, config)
    if config.group_by == "donor":
        return assign_by_unit([(p["dataset"], p["donor_id"]) for p in puzzles], ns, config)
    return assign_by_unit([p["dataset"] for p in puzzles], ns, config)


# -- checking and writing ---------------------------------------------------------------------
def overlap_counts(train: Iterable[dict[str, Any]],
                   test: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Distinct datasets, donors and cells in each split and in both, counted from the records."""
    def keys(records: Iterable[dict[str, Any]]) -> dict[str, set]:
        out: dict[str, set] = {"datasets": set(), "donors": set(), "cells": set()}
        for r in records:
            out["datasets"].add(r["dataset"])
            out["donors"].add((r["dataset"], r["donor_id"]))
            out["cells"].update((r["dataset"], c) for c in r["cell_ids"])
        return out

    a, b = keys(train), keys(test)
    return {"train": {k: len(v) for k, v in a.items()},
            "test": {k: len(v) for k, v in b.items()},
            "shared": {k: len(a[k] & b[k]) for k in a}}


def split_warnings(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> list[str]:
    """What makes a leak-free split mislead: test N or cell types training never shows, or a
    test set larger than the training set."""
    from cellpuzzle_cli.answer import answer_items

    def types(records: list[dict[str, Any]]) -> Counter[str]:
        return Counter(t for r in records for t in answer_items(r["assistant_msg"]))

    notes = []
    unseen_n = sorted({r["n"] for r in test} - {r["n"] for r in train})
    if unseen_n:
        held = sum(1 for r in test if r["n"] in unseen_n)
        notes.append(f"{held} test puzzle(s) have N = {', '.join(map(str, unseen_n))}, a size no "
                     "training puzzle has; scores at that N measure generalisation to a new "
                     "size. Make puzzles of every N for every donor, or try another --seed.")
    trained, test_types = {t.lower() for t in types(train)}, types(test)   # scored ignoring case
    unseen = sorted(t for t in test_types if t.lower() not in trained)
    if unseen:
        shown = ", ".join(f"'{t}' ({test_types[t]} cells)" for t in unseen[:5])
        notes.append(f"{len(unseen)} cell type(s) appear in test but never in training: {shown}"
                     f"{' …' if len(unseen) > 5 else ''}; a trained model cannot have learnt them. "
                     "Try another --seed or --group-by, or leave those types out.")
    if len(test) > len(train):
        notes.append(f"The test set ({len(test)} puzzles) is larger than the training set "
                     f"({len(train)}). Lower --test-fraction or --max-test (or make-qa "
                     "--test-cells), unless this is meant.")
    return notes


def split_record(puzzle: dict[str, Any], system_msg: str | None = None) -> dict[str, Any]:
    """A split record; without a user's `system_msg`, the shipped one for the puzzle's shape
    (closed, or open set with more candidates than cells)."""
    n = int(puzzle["n"])
    system_msg = system_msg or system_prompt(n, len(record_candidates(puzzle)))
    return {"system_msg": system_msg, "user_msg": puzzle["question"],
            "assistant_msg": puzzle["answer"], "puzzle_id": puzzle["puzzle_id"],
            "n": n, "group": puzzle["group"], "dataset": puzzle["dataset"],
            "donor_id": puzzle["donor_id"], "cell_ids": list(puzzle["cell_ids"]),
            **({IDS_FIELD: puzzle[IDS_FIELD]} if IDS_FIELD in puzzle else {})}


def split_puzzles(puzzles_path: Path, out_dir: Path, config: SplitSettings = SplitSettings(),
                  overwrite: bool = False, progress: Progress | None = None) -> SplitResult:
    """Assign puzzles to train/test, verify nothing leaks, write both files atomically."""
    check_settings(config)
    custom = config.system_prompt_file
    system_msg = load_system_prompt(custom) if custom is not None else None
    if custom is not None and not system_msg:
        raise UserError(f"The system prompt file {config.system_prompt_file} is empty. Give a "
                        "file with the instructions text, or drop --system-prompt-file.")
    path = resolve_puzzles_path(puzzles_path)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        puzzles = load_puzzles(path)
        if progress:
            progress(0, total=3, description="Splitting puzzles")
        plan = assign(puzzles, config)
        if progress:
            progress(1)
        train = [split_record(puzzles[i], system_msg) for i in plan.train]
        test = [split_record(puzzles[i], system_msg) for i in plan.test]
        if not train or not test:
            raise UserError(f"The split left {len(train)} train and {len(test)} test puzzles. "
                            "Make more puzzles (make-qa --per-n), or adjust --test-fraction / "
                            "--max-test.")
        counts = overlap_counts(train, test)
        unit = {"donor": "donors", "dataset": "datasets", "cell": "cells"}[config.group_by]
        if counts["shared"]["cells"] or counts["shared"][unit]:
            raise RuntimeError(f"split leaked {counts['shared']} with group_by={config.group_by}")
        per_n: dict[int, dict[str, int]] = {}
        for column, idx in (("train", plan.train), ("test", plan.test),
                            ("dropped_leak", plan.dropped_leak), ("dropped_cap", plan.dropped_cap)):
            for i in idx:
                row = per_n.setdefault(int(puzzles[i]["n"]), dict.fromkeys(
                    ("train", "test", "dropped_leak", "dropped_cap"), 0))
                row[column] += 1
        result = SplitResult(out_dir=out_dir, train_path=out_dir / TRAIN_FILE,
                             test_path=out_dir / TEST_FILE, group_by=config.group_by,
                             per_n=dict(sorted(per_n.items())), counts=counts,
                             method=plan.method, warnings=split_warnings(train, test))
        write_jsonl(tmp / TRAIN_FILE, train)
        write_jsonl(tmp / TEST_FILE, test)
        if progress:
            progress(1)
        save_settings(tmp, "split", config)
        if progress:
            progress(1)
    return result


def step(job: Job, progress: Progress) -> SplitResult:
    """split as a pipeline step (see `runner`)."""
    return split_puzzles(job.inputs["puzzles"], job.output, job.settings,
                         overwrite=job.overwrite, progress=progress)
