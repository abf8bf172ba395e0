"""Cell-o1's own files, used as a new user would: each works or exits 2 naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import (
    assert_user_error,
    gold_records,
    make_records,
    prediction_lines,
    write_records,
)


def _cello1(record: dict) -> dict:
    """A record as Cell-o1's JSON files hold it: the three messages, no id."""
    return {k: record[k] for k in ("system_msg", "user_msg", "assistant_msg")}


@pytest.fixture
def cello1_dir(tmp_path) -> Path:
    """Cell-o1's layout: data/train/train_data.json and data/test/test_data.json (JSON arrays)."""
    root = tmp_path / "data"
    for split, count, seed in (("train", 40, 1), ("test", 12, 2)):
        (root / split).mkdir(parents=True)
        records = [_cello1(r) for r in make_records(count, seed=seed)]
        (root / split / f"{split}_data.json").write_text(json.dumps(records))
    return root


def test_predict_finds_cello1_train_file_and_score_takes_its_test_file(cli, cello1_dir, tmp_path):
    test = cello1_dir / "test" / "test_data.json"
    result = cli("predict", "--backend", "baseline", "--data", test, "-o", tmp_path / "preds")
    assert result.code == 0, result.output
    assert "Cell-o1's layout" in " ".join(result.output.split())
    assert "train_data.json" in result.output
    lines = [json.loads(x) for x in (tmp_path / "preds" / "shard-0-of-1.jsonl").read_text()
             .splitlines()]
    assert len(lines) == 12 and all(x["puzzle_id"].startswith("sha-") for x in lines)

    result = cli("score", tmp_path / "preds", "--reference", test, "--json", tmp_path / "s.json")
    assert result.code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["missing_count"] == 0 and report["count"] == 12


def test_predict_without_a_train_file_names_the_option(cli, cello1_dir, tmp_path):
    (cello1_dir / "train" / "train_data.json").unlink()
    result = cli("predict", "--backend", "baseline", "--data",
                 cello1_dir / "test" / "test_data.json", "-o", tmp_path / "preds")
    assert_user_error(result, "--train FILE")


def test_score_reference_without_puzzles_names_the_files_it_takes(cli, tmp_path):
    preds = write_records(tmp_path / "run" / "p.jsonl",
                          prediction_lines(gold_records(["a | b"]), ["x"]))
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([{"note": "no puzzle here"}]))
    assert_user_error(cli("score", preds.parent, "--reference", ref), "holds no puzzles",
                      "test_data.json")


def test_to_parquet_takes_data_option_and_data_source(cli, cello1_dir, tmp_path):
    import pandas as pd

    train = cello1_dir / "train" / "train_data.json"
    result = cli("to-parquet", "--data", train, "-o", tmp_path / "rl", "--data-source",
                 "cell_data", "--val-size", "0.25")
    assert result.code == 0, result.output
    rows = pd.read_parquet(tmp_path / "rl" / "train.parquet")
    assert set(rows["data_source"]) == {"cell_data"}       # what Cell-o1's reward requires
    positional = cli("to-parquet", train, "-o", tmp_path / "rl2", "--data-source", "cell_data",
                     "--val-size", "0.25")
    assert positional.code == 0, positional.output
    assert ((tmp_path / "rl2" / "train.parquet").read_bytes()
            == (tmp_path / "rl" / "train.parquet").read_bytes())


def test_to_parquet_refuses_two_different_files(cli, cello1_dir, tmp_path):
    result = cli("to-parquet", cello1_dir / "train" / "train_data.json", "--data",
                 cello1_dir / "test" / "test_data.json", "-o", tmp_path / "rl")
    assert_user_error(result, "Two training files given", "--data")
