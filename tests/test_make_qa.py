"""make-qa: puzzles that are valid, seeded, quota-bound, and chained from build-context."""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from pathlib import Path

import orjson
import pytest
from fixtures import TABLE_TYPES, assert_user_error, cell_rows, donors_dataset, write_cells

from cellpuzzle_cli.answer import ANSWER_SEPARATOR
from cellpuzzle_cli.config import layer_settings
from cellpuzzle_cli.make_qa import MakeQaSettings, count_cell_sets, make_puzzles
from cellpuzzle_cli.prompts import parse_question


def read_puzzles(out: Path) -> list[dict]:
    return [orjson.loads(line) for line in (out / "puzzles.jsonl").read_bytes().splitlines()]


def cell_types_by_id(cells_dir: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    out = {}
    for f in cells_dir.rglob("*.parquet"):
        t = pq.read_table(f, columns=["cell_id", "cell_type"]).to_pydict()
        out.update(zip(t["cell_id"], t["cell_type"]))
    return out


def test_every_puzzle_is_a_valid_cellpuzzle(tmp_path):
    cells = donors_dataset(tmp_path / "cells", n_donors=3, n_types=6)
    result = make_puzzles(cells, tmp_path / "out", MakeQaSettings(per_n=4, seed=1))
    puzzles = read_puzzles(tmp_path / "out")
    truth = cell_types_by_id(cells)
    assert len(puzzles) == result.n_puzzles == 3 * 4 * 4  # donors × N in 3..6 × quota
    assert len({p["puzzle_id"] for p in puzzles}) == len(puzzles)
    for p in puzzles:
        answer = p["answer"].split(ANSWER_SEPARATOR)
        assert answer == [truth[c] for c in p["cell_ids"]], "answer must follow cell order"
        assert len(set(answer)) == p["n"] == len(p["cell_ids"]), "N distinct types"
        assert sorted(p["candidates"]) == sorted(answer)
        genes, candidates = parse_question(p["question"])
        assert candidates == p["candidates"]
        for cell_id, line in zip(p["cell_ids"], genes):
            assert line == [f"{cell_id}_g{j}" for j in range(4)], "Cell i lists cell i's genes"
        assert p["question"].startswith(f"Donor {p['donor_id']} is a 40-year-old woman")
        assert p["group"] == p["donor_id"] and p["dataset"] == "ds1"
        assert all(c.startswith(f"ds1-{p['donor_id']}-") for c in p["cell_ids"])
    assert result.puzzles_per_n == {3: 12, 4: 12, 5: 12, 6: 12}
    # Shuffled by default: with 48 puzzles some candidate list differs from sorted order.
    assert any(p["candidates"] != sorted(p["candidates"]) for p in puzzles)


def test_sort_candidates_sorts_without_changing_the_cells(tmp_path):
    cells = donors_dataset(tmp_path / "cells", n_donors=2)
    make_puzzles(cells, tmp_path / "shuffled", MakeQaSettings(per_n=3))
    make_puzzles(cells, tmp_path / "sorted", MakeQaSettings(per_n=3, sort_candidates=True))
    shuffled, ordered = read_puzzles(tmp_path / "shuffled"), read_puzzles(tmp_path / "sorted")
    assert all(p["candidates"] == sorted(p["candidates"]) for p in ordered)
    assert [p["cell_ids"] for p in shuffled] == [p["cell_ids"] for p in ordered]
    assert parse_question(ordered[0]["question"])[1] == sorted(ordered[0]["candidates"])


def test_quota_type_limits_and_skipped_groups(tmp_path):
    cells = tmp_path / "cells"
    write_cells(cells / "big.parquet", cell_rows("ds", "rich", {t: 5 for t in TABLE_TYPES[:5]}))
    write_cells(cells / "few.parquet", cell_rows("ds", "poor", {t: 5 for t in TABLE_TYPES[:2]}))
    result = make_puzzles(cells, tmp_path / "out", MakeQaSettings(min_n=3, max_n=15, per_n=7))
    assert result.groups_used == 1 and result.groups_skipped == 1
    assert "ds:poor (2 types)" in result.skipped_examples[0]
    # N above the group's 5 types is skipped for it; each N gets exactly the quota.
    assert result.puzzles_per_n == {3: 7, 4: 7, 5: 7}
    per_group_n = Counter((p["group"], p["n"]) for p in read_puzzles(tmp_path / "out"))
    assert set(per_group_n.values()) == {7}


def test_no_duplicate_cell_sets_and_shortfall_is_reported(tmp_path):
    # One cell per type, 4 types: only C(4,3) = 4 distinct sets of 3 and 1 set of 4 exist.
    cells = write_cells(tmp_path / "c.parquet", cell_rows("ds", "D", {t: 1 for t in TABLE_TYPES[:4]}))
    result = make_puzzles(cells, tmp_path / "out", MakeQaSettings(per_n=10))
    puzzles = read_puzzles(tmp_path / "out")
    assert result.puzzles_per_n == {3: 4, 4: 1}
    assert result.short_per_n == {3: 6, 4: 9}
    assert len({frozenset(p["cell_ids"]) for p in puzzles}) == len(puzzles)
    assert count_cell_sets([2, 3, 4], 2) == 2 * 3 + 2 * 4 + 3 * 4


def test_batches_make_separate_groups_unless_ignored(tmp_path):
    cells = tmp_path / "cells"
    for batch in ("b1", "b2"):
        write_cells(cells / f"{batch}.parquet",
                    cell_rows("ds", "D1", {t: 3 for t in TABLE_TYPES[:3]}, batch=batch))
    make_puzzles(cells, tmp_path / "by_batch", MakeQaSettings(per_n=2))
    make_puzzles(cells, tmp_path / "merged", MakeQaSettings(per_n=2, ignore_batch=True))
    by_batch = read_puzzles(tmp_path / "by_batch")
    assert sorted({p["group"] for p in by_batch}) == ["D1/b1", "D1/b2"]
    for p in by_batch:
        assert all(f"-{p['group'].split('/')[1]}-" in c for c in p["cell_ids"])
    assert {p["group"] for p in read_puzzles(tmp_path / "merged")} == {"D1"}


def test_mixed_contexts_use_the_most_common_and_are_counted(tmp_path):
    rows = (cell_rows("ds", "D", {t: 2 for t in TABLE_TYPES[:3]}, batch=None, context="Blood.")
            + cell_rows("ds", "D", {TABLE_TYPES[3]: 1}, batch=None, context="Lung."))
    cells = write_cells(tmp_path / "c.parquet", rows)
    result = make_puzzles(cells, tmp_path / "out", MakeQaSettings(min_n=4, max_n=4, per_n=3))
    assert result.mixed_context == 3
    assert all(p["question"].startswith("Blood.\n") for p in read_puzzles(tmp_path / "out"))


def test_test_cells_folds_use_disjoint_cells(tmp_path):
    cells = donors_dataset(tmp_path / "cells", n_donors=1, cells_per_type=10, n_types=5)
    result = make_puzzles(cells, tmp_path / "out", MakeQaSettings(per_n=10, test_cells=0.3))
    puzzles = read_puzzles(tmp_path / "out")
    used = defaultdict(set)
    for p in puzzles:
        used[p["cell_fold"]].update(p["cell_ids"])
        assert f":{p['cell_fold']}:" in p["puzzle_id"]
    assert used["train"] and used["test"] and not used["train"] & used["test"]
    assert result.per_fold == {"test": 3 * 3, "train": 7 * 3}  # quota 10 = 3 test + 7 train


def test_cli_is_deterministic_and_seeded(tmp_path, cli):
    cells = donors_dataset(tmp_path / "cells", n_donors=2)
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(runs, ("7", "7", "8")):
        result = cli("make-qa", cells, "-o", out, "--per-n", "5", "--seed", seed)
        assert result.code == 0, result.output
    for name in ("puzzles.jsonl", "make-qa.yaml"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes()
    assert (runs[0] / "puzzles.jsonl").read_bytes() != (runs[2] / "puzzles.jsonl").read_bytes()
    saved = layer_settings(MakeQaSettings, runs[0] / "make-qa.yaml")
    assert saved == MakeQaSettings(per_n=5, seed=7)
    again = cli("make-qa", cells, "-o", tmp_path / "again", "--config", runs[0] / "make-qa.yaml")
    assert again.code == 0, again.output
    assert (tmp_path / "again" / "puzzles.jsonl").read_bytes() == \
        (runs[0] / "puzzles.jsonl").read_bytes()
    assert "Groups used: 2" in result.stdout


def test_single_parquet_file_input(tmp_path, cli):
    cells = write_cells(tmp_path / "one.parquet", cell_rows("ds", "D", {t: 2 for t in TABLE_TYPES[:3]}))
    result = cli("make-qa", cells, "-o", tmp_path / "out", "--per-n", "2")
    assert result.code == 0, result.output
    assert len(read_puzzles(tmp_path / "out")) == 2


def test_takes_the_latest_build_context_output_from_the_manifest(tmp_path, cli):
    from cellpuzzle_cli.manifest import Artifact, Kind, Manifest

    cells = donors_dataset(tmp_path / "cells", n_donors=1)
    Manifest(cli.manifest).record("build-context", {}, [], [Artifact(cells, "cells")],
                                  time.time(), argv=["cellpuzzle", "build-context"])
    result = cli("make-qa", "-o", tmp_path / "puzzles", "--per-n", "2")
    assert result.code == 0, result.output
    assert "Using cells folder from the manifest" in result.output
    entry = Manifest(cli.manifest).latest("make-qa")
    assert entry.inputs[0].path == "cells"
    assert entry.outputs[0].name == "puzzles" and entry.outputs[0].nfiles == 3  # + settings, stamp
    assert Manifest(cli.manifest).latest_output(Kind.PUZZLES) == (tmp_path / "puzzles")


@pytest.mark.parametrize("case", ["no_cell_files", "existing_output", "missing_column",
                                  "bad_n_range", "no_input_no_manifest", "too_few_types"])
def test_bad_input_is_a_clear_user_error(tmp_path, cli, case):
    cells = tmp_path / "cells"
    out = tmp_path / "out"
    args = [cells, "-o", out]
    if case == "no_cell_files":
        cells.mkdir()
        (cells / "notes.txt").write_text("not cells")
        expected = ("no cell files", "build-context")
    elif case == "existing_output":
        donors_dataset(cells, n_donors=1)
        out.mkdir()
        (out / "puzzles.jsonl").write_text("old\n")
        expected = ("already", "--overwrite")
    elif case == "missing_column":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cells.mkdir()
        pq.write_table(pa.table({"cell_id": ["a"], "cell_type": ["T"]}), cells / "x.parquet")
        expected = ("lacks", "column(s)", "dataset", "cell_type")
    elif case == "bad_n_range":
        donors_dataset(cells, n_donors=1)
        args += ["--min-n", "5", "--max-n", "4"]
        expected = ("--max-n (4)", "--min-n (5)")
    elif case == "no_input_no_manifest":
        args = ["-o", out]
        expected = ("no cells folder", "build-context")
    else:
        write_cells(cells / "x.parquet", cell_rows("ds", "D", {t: 3 for t in TABLE_TYPES[:2]}))
        expected = ("no puzzles", "--min-n")
    result = cli("make-qa", *args)
    assert_user_error(result, *expected)
    if case == "existing_output":
        assert (out / "puzzles.jsonl").read_text() == "old\n"
    else:
        assert not out.exists(), "nothing half-written"


# -- open-set puzzles (--extra-candidates) and warnings ---------------------------------------
def test_closed_puzzles_are_byte_identical_to_before_open_sets(tmp_path):
    # sha256 of the files make-qa wrote before --extra-candidates existed (same data, seeds).
    cells = donors_dataset(tmp_path / "cells", n_donors=3, n_types=6)
    pinned = {"a": ("0573159b88b7417a350201a3d3f69225bf3a2084119df5eef7055c1247a915de",
                    MakeQaSettings(per_n=5, seed=3)),
              "b": ("81a987d976072a269e700e9ccf7acdd3df6ca300cfb701cd381714e535d92744",
                    MakeQaSettings(per_n=5, seed=3, sort_candidates=True, test_cells=0.3))}
    for name, (digest, config) in pinned.items():
        make_puzzles(cells, tmp_path / name, config)
        data = (tmp_path / name / "puzzles.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name


def open_set_cells(root: Path) -> Path:
    """Dataset ds: donor A with types T0-T5, donor B with T0-T2, T6, T7; dataset other: donor C
    with types X0-X2, which ds's puzzles must never be offered."""
    write_cells(root / "a.parquet", cell_rows("ds", "A", {f"T{i}": 3 for i in range(6)}))
    write_cells(root / "b.parquet", cell_rows("ds", "B", {f"T{i}": 3 for i in (0, 1, 2, 6, 7)}))
    write_cells(root / "c.parquet", cell_rows("other", "C", {f"X{i}": 3 for i in range(3)}))
    return root


def test_extra_candidates_come_from_the_group_then_the_dataset(tmp_path):
    cells = open_set_cells(tmp_path / "cells")
    config = MakeQaSettings(min_n=3, max_n=6, per_n=4, seed=5, extra_candidates=2)
    result = make_puzzles(cells, tmp_path / "open", config)
    puzzles = read_puzzles(tmp_path / "open")
    group_types = {"A": {f"T{i}" for i in range(6)}, "B": {"T0", "T1", "T2", "T6", "T7"},
                   "C": {"X0", "X1", "X2"}}
    dataset_types = {"ds": {f"T{i}" for i in range(8)}, "other": group_types["C"]}
    short = 0
    for p in puzzles:
        answer = p["answer"].split(ANSWER_SEPARATOR)
        extras = [c for c in p["candidates"] if c not in answer]
        assert len(set(p["candidates"])) == len(p["candidates"]), "each type at most once"
        assert sorted(p["candidates"]) == sorted(answer + extras)
        near = group_types[p["group"]] - set(answer)
        far = dataset_types[p["dataset"]] - group_types[p["group"]]
        assert len(extras) == min(2, len(near) + len(far))
        if len(near) >= 2:
            assert set(extras) <= near, "the group's own types come first"
        else:
            assert near <= set(extras) and set(extras) <= near | far
        short += len(extras) < 2
        assert parse_question(p["question"])[1] == p["candidates"]
    # C's puzzles (3 types, no other type in its dataset) get none; A's N=6 and B's N=5 puzzles
    # take the dataset's other types.
    assert short == result.extra_short == 4 and result.summary()["extra_short"] == 4
    assert any("4 of" in w and "--extra-candidates 2" in w for w in result.warnings)
    # The cells are those of closed puzzles with the same seed; the candidates are shuffled.
    make_puzzles(cells, tmp_path / "closed", MakeQaSettings(min_n=3, max_n=6, per_n=4, seed=5))
    closed = read_puzzles(tmp_path / "closed")
    assert [p["cell_ids"] for p in puzzles] == [p["cell_ids"] for p in closed]
    assert any(p["candidates"][-1] not in p["answer"] for p in puzzles)
    make_puzzles(cells, tmp_path / "again", config)
    assert (tmp_path / "again" / "puzzles.jsonl").read_bytes() == \
        (tmp_path / "open" / "puzzles.jsonl").read_bytes()


def test_open_set_question_states_the_counts(tmp_path, cli):
    cells = open_set_cells(tmp_path / "cells")
    result = cli("make-qa", cells, "-o", tmp_path / "out", "--min-n", "3", "--max-n", "3",
                 "--per-n", "2", "--extra-candidates", "2", "--sort-candidates")
    assert result.code == 0, result.output
    p = next(p for p in read_puzzles(tmp_path / "out") if p["group"] == "A")
    assert len(p["candidates"]) == 5 and p["candidates"] == sorted(p["candidates"])
    assert ("Candidate cell types (5 for 3 cells; each cell is exactly one of them, each "
            "candidate fits at most one cell, leaving 2 unused):") in p["question"]
    assert "use each exactly once" not in p["question"]
    assert layer_settings(MakeQaSettings, tmp_path / "out" / "make-qa.yaml").extra_candidates == 2
    assert "puzzles got fewer than --extra-candidates 2" in " ".join(result.stderr.split())


def test_requested_n_without_puzzle_is_a_warning_in_the_output_and_manifest(tmp_path, cli):
    from cellpuzzle_cli.manifest import Manifest

    cells = donors_dataset(tmp_path / "cells", n_donors=2, n_types=4)
    result = cli("make-qa", cells, "-o", tmp_path / "out", "--min-n", "3", "--max-n", "6",
                 "--per-n", "2")
    assert result.code == 0, result.output
    said = " ".join(result.stderr.split())
    for n in (5, 6):
        assert f"N={n}: no puzzle, because no group has {n} distinct cell types" in said
    assert "N=4:" not in said
    warnings = Manifest(cli.manifest).latest("make-qa").extra["summary"]["warnings"]
    assert [w.split(":")[0] for w in warnings] == ["N=5", "N=6"]
