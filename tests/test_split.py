"""split: nothing shared between train and test, N-stratified, capped, seeded, chained."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest
from fixtures import TABLE_TYPES, assert_user_error, cell_rows, donors_dataset, write_cells

from cellpuzzle_cli.make_qa import MakeQaSettings, make_puzzles
from cellpuzzle_cli.prompts import SYSTEM_PROMPT
from cellpuzzle_cli.split import SplitSettings, split_puzzles


def read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def puzzles(tmp_path: Path, n_donors: int = 6, per_n: int = 6, test_cells: float = 0.0,
            cells_per_type: int = 6, datasets: int = 1) -> Path:
    cells = tmp_path / "cells"
    for ds in range(datasets):
        for d in range(n_donors):
            write_cells(cells / f"ds{ds}_d{d}.parquet",
                        cell_rows(f"ds{ds}", f"D{d}", {t: cells_per_type for t in TABLE_TYPES[:6]}))
    out = tmp_path / "puzzles"
    make_puzzles(cells, out, MakeQaSettings(per_n=per_n, test_cells=test_cells))
    return out


def cells_of(records: list[dict]) -> set:
    return {(r["dataset"], c) for r in records for c in r["cell_ids"]}


def test_donor_split_is_disjoint_stratified_and_keeps_every_puzzle(tmp_path):
    source = puzzles(tmp_path)  # 6 donors × N 3..6 × 6 = 144 puzzles
    result = split_puzzles(source, tmp_path / "s", SplitSettings(test_fraction=0.3, seed=3))
    train, test = read(result.train_path), read(result.test_path)
    assert len(train) + len(test) == 144
    assert not {r["donor_id"] for r in train} & {r["donor_id"] for r in test}
    assert not cells_of(train) & cells_of(test)
    assert result.counts["shared"] == {"datasets": 1, "donors": 0, "cells": 0}
    # Whole donors (24 puzzles each) until ≥ 30 % of 144: two donors.
    assert len(test) == 48 and result.counts["test"]["donors"] == 2
    assert Counter(r["n"] for r in test) == {3: 12, 4: 12, 5: 12, 6: 12}
    source_by_id = {p["puzzle_id"]: p for p in read(source / "puzzles.jsonl")}
    for r in train[:3] + test[:3]:
        p = source_by_id[r["puzzle_id"]]
        assert r["user_msg"] == p["question"] and r["assistant_msg"] == p["answer"]
        assert r["system_msg"] == SYSTEM_PROMPT and "<answer>" not in r["assistant_msg"]
        assert (r["n"], r["group"], r["cell_ids"]) == (p["n"], p["group"], p["cell_ids"])
    assert list(train[0])[:6] == ["system_msg", "user_msg", "assistant_msg", "puzzle_id", "n",
                                  "group"]


def test_max_test_caps_test_stratified_and_never_moves_puzzles_to_train(tmp_path):
    source = puzzles(tmp_path, n_donors=3)
    result = split_puzzles(source, tmp_path / "s", SplitSettings(test_fraction=0.3, max_test=10))
    train, test = read(result.train_path), read(result.test_path)
    assert len(test) == 10
    per_n = Counter(r["n"] for r in test)
    assert max(per_n.values()) - min(per_n.values()) <= 1 and set(per_n) == {3, 4, 5, 6}
    assert result.total("dropped_cap") == 24 - 10  # one donor's 24 puzzles, 10 kept
    assert len(train) == 48
    assert not {r["donor_id"] for r in train} & {r["donor_id"] for r in test}


def test_dataset_split_keeps_datasets_apart(tmp_path):
    source = puzzles(tmp_path, n_donors=2, per_n=2, datasets=3)
    result = split_puzzles(source, tmp_path / "s", SplitSettings(group_by="dataset"))
    train, test = read(result.train_path), read(result.test_path)
    assert not {r["dataset"] for r in train} & {r["dataset"] for r in test}
    assert result.counts["shared"]["datasets"] == 0 and train and test


def test_cell_split_without_folds_drops_and_counts_straddling_puzzles(tmp_path):
    source = puzzles(tmp_path, n_donors=1, per_n=15)
    result = split_puzzles(source, tmp_path / "s", SplitSettings(group_by="cell",
                                                                 test_fraction=0.2))
    train, test = read(result.train_path), read(result.test_path)
    assert not cells_of(train) & cells_of(test)
    assert result.counts["shared"]["cells"] == 0 and result.counts["shared"]["donors"] == 1
    dropped = result.total("dropped_leak")
    assert dropped > 0 and len(train) + len(test) + dropped == 60
    assert Counter(r["n"] for r in test) == {3: 3, 4: 3, 5: 3, 6: 3}  # 20 % of 15 per N
    kept = {r["puzzle_id"] for r in train + test}
    test_cells = cells_of(test)
    for p in read(source / "puzzles.jsonl"):
        if p["puzzle_id"] not in kept:  # every dropped puzzle would have leaked a cell
            assert {(p["dataset"], c) for c in p["cell_ids"]} & test_cells


def test_cell_split_with_make_qa_folds_loses_nothing(tmp_path):
    source = puzzles(tmp_path, n_donors=1, per_n=10, test_cells=0.2, cells_per_type=10)
    result = split_puzzles(source, tmp_path / "s", SplitSettings(group_by="cell"))
    train, test = read(result.train_path), read(result.test_path)
    assert (len(train), len(test), result.total("dropped_leak")) == (32, 8, 0)
    assert not cells_of(train) & cells_of(test)
    assert "folds" in result.method


def test_cli_is_deterministic_with_system_prompt_override(tmp_path, cli):
    source = puzzles(tmp_path, n_donors=4, per_n=3)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Answer as <answer>a | b</answer>.\n")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        result = cli("split", source, "-o", out, "--seed", "5", "--system-prompt-file", prompt)
        assert result.code == 0, result.output
    for name in ("train.jsonl", "test.jsonl", "split.yaml"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert {r["system_msg"] for r in read(outs[0] / "train.jsonl")} == {
        "Answer as <answer>a | b</answer>."}
    assert "shared 0" in result.stdout
    other = cli("split", source, "-o", tmp_path / "c", "--seed", "6")
    assert other.code == 0
    assert (tmp_path / "c" / "test.jsonl").read_bytes() != (outs[0] / "test.jsonl").read_bytes()


def test_chains_from_make_qa_and_records_train_and_test(tmp_path, cli):
    from cellpuzzle_cli.manifest import Kind, Manifest

    cells = donors_dataset(tmp_path / "cells", n_donors=3)
    assert cli("make-qa", cells, "-o", tmp_path / "puzzles", "--per-n", "2").code == 0
    result = cli("split", "-o", tmp_path / "splits")
    assert result.code == 0, result.output
    m = Manifest(cli.manifest)
    entry = m.latest("split")
    assert [o.name for o in entry.outputs] == ["train", "test"]
    assert entry.inputs[0].path == "puzzles"
    test_path = tmp_path / "splits" / "test.jsonl"
    assert m.sibling_output(test_path, Kind.TRAIN_PUZZLES) == tmp_path / "splits" / "train.jsonl"


@pytest.mark.parametrize("case", ["unknown_group_by", "one_donor", "existing_output",
                                  "folder_without_puzzles", "split_file_as_input",
                                  "empty_system_prompt"])
def test_bad_input_is_a_clear_user_error(tmp_path, cli, case):
    out = tmp_path / "out"
    args: list = []
    if case == "unknown_group_by":
        args = [tmp_path, "--group-by", "patient"]
        expected = ("patient", "donor, dataset, cell")
    elif case == "one_donor":
        args = [puzzles(tmp_path, n_donors=1, per_n=2)]
        expected = ("one donor", "--group-by cell")
    elif case == "existing_output":
        args = [puzzles(tmp_path, n_donors=2, per_n=2)]
        out.mkdir()
        (out / "train.jsonl").write_text("old\n")
        expected = ("already", "--overwrite")
    elif case == "folder_without_puzzles":
        (tmp_path / "empty").mkdir()
        args = [tmp_path / "empty"]
        expected = ("puzzles.jsonl", "make-qa")
    elif case == "split_file_as_input":
        source = puzzles(tmp_path, n_donors=2, per_n=2)
        split_puzzles(source, tmp_path / "first")
        args = [tmp_path / "first" / "train.jsonl"]
        expected = ("lacks", "question", "train/test", "make-qa")
    else:
        prompt = tmp_path / "blank.txt"
        prompt.write_text("\n")
        args = [puzzles(tmp_path, n_donors=2, per_n=2), "--system-prompt-file", prompt]
        expected = ("empty", "--system-prompt-file")
    result = cli("split", *args, "-o", out)
    assert_user_error(result, *expected)
    if case == "existing_output":
        assert (out / "train.jsonl").read_text() == "old\n"
    else:
        assert not out.exists(), "nothing half-written"
