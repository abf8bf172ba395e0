"""Hostile input beyond annotate (issue 22's fresh pass, docs/hostile-inputs.md): outputs named
like inputs, settings given twice, `--format json` on usage errors, a manifest from a newer
version, test data made again under the same puzzle ids, a moved project folder, and gene or
donor columns that cannot mean what they say. Every test runs the real CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures import (
    assert_says,
    assert_user_error,
    donors_dataset,
    make_records,
    run_cli,
    write_records,
)
from test_input_checks import build, labels, write_h5ad


# -- outputs never replace inputs ------------------------------------------------------------
def test_an_output_folder_that_is_or_holds_an_input_is_refused(cli, tmp_path):
    cells = donors_dataset(tmp_path / "cells")
    before = sorted(p.name for p in cells.rglob("*"))
    for out in (cells, tmp_path):   # the input folder itself, a folder holding it
        assert_user_error(cli("make-qa", cells, "-o", out, "--overwrite"), "-o",
                          "an input of this run", "give -o another path")
        assert sorted(p.name for p in cells.rglob("*")) == before
    source = write_h5ad(tmp_path / "data.h5ad", labels())
    assert_user_error(cli("build-context", source, "-o", source, "--overwrite"),
                      "is an input of this run")
    assert source.is_file()


def _predicted(cli, tmp_path: Path) -> Path:
    """A baseline predict run of six puzzles (its folder)."""
    test = write_records(tmp_path / "test.jsonl", make_records(6))
    train = write_records(tmp_path / "train.jsonl", make_records(20, seed=1))
    preds = tmp_path / "preds"
    assert cli("predict", "--backend", "baseline", "--data", test, "--train", train,
               "-o", preds).code == 0
    return preds


def test_score_files_never_overwrite_predictions_or_each_other(cli, tmp_path):
    preds = _predicted(cli, tmp_path)
    shard = preds / "shard-0-of-1.jsonl"
    kept = shard.read_bytes()
    assert_user_error(cli("score", preds, "--html", shard), "--html", "an input of this run")
    assert_user_error(cli("score", "--html", shard), "--html", "an input of this run")
    assert shard.read_bytes() == kept
    report = tmp_path / "report.out"
    assert_user_error(cli("score", preds, "--json", report, "--html", report),
                      "--json and --html both name")
    assert not report.exists()


# -- settings ------------------------------------------------------------------------------------
def test_a_key_given_twice_in_a_config_file_is_refused(cli, tmp_path):
    cells = donors_dataset(tmp_path / "cells")
    config = tmp_path / "make-qa.yaml"
    config.write_text("seed: 1\nper_n: 2\nseed: 2\n")
    out = tmp_path / "puzzles"
    assert_user_error(cli("make-qa", cells, "-o", out, "--config", config),
                      "the key 'seed' is given twice (lines 1 and 3)")
    assert not out.exists()
    config.write_text("<<: {seed: 4, per_n: 2}\nper_n: 3\n")
    assert cli("make-qa", cells, "-o", out, "--config", config).code == 0   # merge keys work
    assert "seed: 4" in (out / "make-qa.yaml").read_text()
    assert "per_n: 3" in (out / "make-qa.yaml").read_text()


@pytest.mark.parametrize("args", [["annotate", "query.h5ad"],                 # no -o
                                  ["make-qa", "-o", "x", "--seed", "abc"],    # a bad value
                                  ["make-qa", "-o", "x", "--no-such-option"]])
def test_usage_errors_answer_in_json_when_json_is_asked_for(cli, args):
    result = cli(*args, "--format", "json")
    assert result.code == 2
    outcome = json.loads(result.stdout)
    assert outcome["state"] == "error" and outcome["exit_code"] == 2 and outcome["error"]
    assert "Usage:" in result.stderr


def test_a_manifest_from_a_newer_version_says_so(cli, tmp_path):
    cli.manifest.write_text(json.dumps({"schema": 2, "entries": []}))
    assert_user_error(cli("make-qa", "-o", tmp_path / "p"), "written by a newer cellpuzzle",
                      "schema 2", "reads schema 1", "Upgrade cellpuzzle")


# -- predict's resume ------------------------------------------------------------------------------
def test_predict_resumes_only_answers_to_the_same_test_data(cli, tmp_path):
    test, train = tmp_path / "test.jsonl", write_records(tmp_path / "train.jsonl",
                                                          make_records(20, seed=1))
    preds = tmp_path / "preds"

    def predict(*extra: str):
        return cli("predict", "--backend", "baseline", "--data", test, "--train", train,
                   "-o", preds, *extra)

    write_records(test, make_records(8, seed=2))
    assert predict("--limit", "3").code == 0
    write_records(test, make_records(8, seed=3))      # made again: the same ids, other puzzles
    assert_user_error(predict(), "holds predictions made with other settings or data",
                      "data: content")
    assert predict("--overwrite").code == 0
    golds = {r["puzzle_id"]: r["assistant_msg"] for r in make_records(8, seed=3)}
    lines = [json.loads(x) for x in (preds / "shard-0-of-1.jsonl").read_text().splitlines()]
    assert {r["puzzle_id"]: r["answer"] for r in lines} == golds


def test_a_moved_project_folder_resumes_its_predictions(tmp_path, monkeypatch):
    project = tmp_path / "project"
    write_records(project / "test.jsonl", make_records(8, seed=2))
    write_records(project / "train.jsonl", make_records(20, seed=1))
    args = ["predict", "--backend", "baseline", "--data", "test.jsonl", "--train",
            "train.jsonl", "-o", "preds"]
    monkeypatch.chdir(project)
    assert run_cli(*args, "--limit", "3", manifest=Path("cellpuzzle.json")).code == 0
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)
    monkeypatch.chdir(moved)
    result = run_cli(*args, manifest=Path("cellpuzzle.json"))
    assert result.code == 0, result.output
    assert len((moved / "preds" / "shard-0-of-1.jsonl").read_text().splitlines()) == 8


# -- build-context: genes and donors ----------------------------------------------------------------
def test_an_empty_gene_name_is_refused(tmp_path):
    source = write_h5ad(tmp_path / "data.h5ad", labels(),
                        genes=[f"G{j}" if j != 3 else "" for j in range(12)])
    result, out = build(tmp_path, source)
    assert_user_error(result, "1 gene names in var names are empty or missing", "column 3")
    assert not out.exists()


def test_donors_that_are_each_one_cell_are_warned_about(tmp_path):
    source = write_h5ad(tmp_path / "data.h5ad", labels())
    result, _ = build(tmp_path, source, "--donor-from-id", "(.*)")
    assert result.code == 0, result.output
    assert_says(result, "each of the 24 cells is a donor group of its own",
                "--donor-from-id '(.*)'")


def test_a_score_file_option_naming_a_folder_is_refused(cli, tmp_path):
    preds = _predicted(cli, tmp_path)
    assert_user_error(cli("score", preds, "--plot", f"{tmp_path}/plots/"), "--plot",
                      "ends in '/', naming a folder", "plots/score.png")
    assert not (tmp_path / "plots").exists()
