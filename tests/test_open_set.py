"""Open-set puzzles (N cells, N + K candidates): prompt, training-data check, reward, score's
chance, the baseline and CellTypist. make-qa's side is in test_make_qa.py."""

from __future__ import annotations

import hashlib
import json

import pytest
from fixtures import (
    answered,
    make_records,
    prediction_lines,
    run_cli,
    write_records,
)

from cellpuzzle_cli.answer import answer_items, judge
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.prompts import (
    CANDIDATES_HEADER,
    OPEN_SYSTEM_PROMPT,
    SYSTEM_PROMPT,
    format_question,
    parse_question,
    record_messages,
    system_prompt,
)
from cellpuzzle_cli.reward import compute_score, make_trl_reward

GOLD = "B cell | T cell | monocyte"
OFFERED = ["platelet", "monocyte", "B cell", "dendritic cell", "T cell"]
OPEN_INFO = {"candidates": OFFERED}


def open_records(count: int, seed: int, extra: int = 2) -> list[dict]:
    return make_records(count, seed, n_cells=(3, 4), extra=extra, id_prefix=f"o{seed}")


# -- the prompt --------------------------------------------------------------------------------
def test_closed_prompt_is_unchanged_and_open_prompt_states_the_rule():
    # sha256 of the system message every closed puzzle was trained and asked with so far
    assert hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest() == \
        "f87e7eec5ce65f10a6f35eeb8f2d75160a844be7f78f9ce4b96bef775a82f9ef"
    assert system_prompt(3, 3) == SYSTEM_PROMPT and system_prompt(3, 5) == OPEN_SYSTEM_PROMPT
    assert "some candidates belong to no cell" in OPEN_SYSTEM_PROMPT
    assert "Every candidate belongs to exactly one cell" not in OPEN_SYSTEM_PROMPT
    cells = [["MS4A1"], ["CD3D"], ["LYZ"]]
    closed = format_question("", cells, ["T cell", "B cell", "monocyte"])
    assert closed.splitlines()[4] == CANDIDATES_HEADER == \
        "Candidate cell types (use each exactly once):"
    opened = format_question("", cells, OFFERED)
    assert opened.splitlines()[4] == ("Candidate cell types (5 for 3 cells; each cell is exactly "
                                      "one of them, each candidate fits at most one cell, "
                                      "leaving 2 unused):")
    assert parse_question(opened) == (cells, OFFERED)
    with pytest.raises(ValueError):
        format_question("", cells, ["T cell", "B cell"])
    # split and the chat turns give each puzzle the system message of its shape
    for record, expected in ((open_records(1, 0)[0], OPEN_SYSTEM_PROMPT),
                             (make_records(1, 0)[0], SYSTEM_PROMPT)):
        assert record["system_msg"] == expected
        assert record_messages({"user_msg": record["user_msg"]})[0]["content"] == expected


def test_training_data_check_takes_open_set_answers_and_refuses_broken_ones(tmp_path):
    from cellpuzzle_cli.training_data import read_training_records

    records = open_records(6, seed=1)
    assert read_training_records(write_records(tmp_path / "ok.jsonl", records)) == records
    _, candidates = parse_question(records[2]["user_msg"])
    gold = answer_items(records[2]["assistant_msg"])
    absent = next(c for c in candidates if c not in gold)
    for bad in ([gold[0], *gold[:-1]],       # a type twice
                ["neutrophil", *gold[1:]],   # no candidate
                [*gold, absent]):            # more items than cells
        records[2]["assistant_msg"] = " | ".join(bad)
        with pytest.raises(UserError, match="used at most once"):
            read_training_records(write_records(tmp_path / "bad.jsonl", records))


# -- the reward --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cello1", "partial", "exact"])
def test_reward_on_open_set_answers(variant):
    info = {**OPEN_INFO, "reward_variant": variant}
    assert compute_score("cellpuzzle", answered(GOLD), GOLD, info) == 1.0
    for bad in ("B cell | B cell | monocyte",           # a type twice
                "B cell | neutrophil | monocyte",       # a type outside the candidates
                "B cell | T cell",                      # too few
                "B cell | T cell | monocyte | platelet"):   # too many, all candidates
        assert compute_score("cellpuzzle", answered(bad), GOLD, info) == -1.0, bad
    # an absent candidate in place of a right one is a wrong cell, not a broken answer
    wrong = compute_score("cellpuzzle", answered("B cell | platelet | monocyte"), GOLD, info)
    assert wrong == pytest.approx({"cello1": 1 / 3, "partial": 2 / 3, "exact": 0.0}[variant])


def test_closed_rows_keep_cello1s_rule():
    # No candidate list travels with a closed puzzle: an invented type costs its cell only.
    assert compute_score(None, answered("B cell | neutrophil | monocyte"), GOLD) == \
        pytest.approx(1 / 3)
    assert judge(answered("B cell | neutrophil | monocyte"), answer_items(GOLD),
                 candidates=OFFERED).n_outside == 1


def test_verl_and_trl_rewards_on_to_parquet_rows(tmp_path):
    import datasets
    import pandas as pd

    from cellpuzzle_cli.rl.trl_backend import load_rows
    from cellpuzzle_cli.to_parquet import rl_rows, write_parquet

    records = open_records(3, seed=2) + make_records(2, seed=3)
    path = tmp_path / "train.parquet"
    write_parquet(path, rl_rows(records))
    frame = pd.read_parquet(path)   # as verl reads it: lists inside extra_info are numpy arrays
    for row, record in zip(frame.itertuples(), records):
        _, offered = parse_question(record["user_msg"])
        has = row.extra_info.get("candidates")
        assert (list(has) if has is not None else None) == (offered if len(offered) > row.extra_info["n"]
                                                            else None)
        gold = row.reward_model["ground_truth"]
        assert compute_score(row.data_source, answered(gold), gold, row.extra_info) == 1.0
    rows = load_rows(path)
    datasets.Dataset.from_list(rows)   # the TRL backend's dataset takes the column as it is
    gold = rows[0]["ground_truth"]
    outside = answered(" | ".join(["neutrophil", *answer_items(gold)[1:]]))
    rewards = make_trl_reward()(completions=[answered(gold), outside], ground_truth=[gold] * 2,
                                candidates=[rows[0]["candidates"]] * 2)
    assert rewards == [1.0, -1.0]


# -- score's chance ----------------------------------------------------------------------------
def test_chance_of_open_set_puzzles(tmp_path):
    from cellpuzzle_cli.score.chance import chance

    assert chance([3, 3], [5, 3]) == pytest.approx({
        "chance_cell_accuracy": (3 / 5 + 3 / 3) / 6, "chance_exact_match": (1 / 60 + 1 / 6) / 2})
    records = [r for r in open_records(8, seed=4) if r["n"] == 3]
    lines = prediction_lines(records, [answered(r["assistant_msg"]) for r in records])
    assert {line["n_candidates"] for line in lines} == {5}
    path = write_records(tmp_path / "run" / "p.jsonl", lines)
    result = run_cli("score", path.parent, "--json", tmp_path / "s.json",
                     manifest=tmp_path / "m.json")
    assert result.code == 0, result.output
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["chance_cell_accuracy"] == pytest.approx(1 / 5)
    assert report["by_n"]["3"]["chance_exact_match"] == pytest.approx(1 / 60)
    assert "0.200 / 0.0167" in result.output   # the By-N table's chance column
    # lines written before open sets (no n_candidates) take the count from --reference
    for line in lines:
        del line["n_candidates"]
    write_records(path, lines)
    result = run_cli("score", path.parent, "--json", tmp_path / "s2.json", "--reference",
                     write_records(tmp_path / "test.jsonl", records), manifest=tmp_path / "m.json")
    assert result.code == 0, result.output
    assert json.loads((tmp_path / "s2.json").read_text())["chance_cell_accuracy"] == \
        pytest.approx(1 / 5)


# -- classical references ----------------------------------------------------------------------
def test_baseline_solves_open_set_puzzles():
    from cellpuzzle_cli.baseline import BaselineBackend

    test = open_records(30, seed=6)
    texts = BaselineBackend(make_records(60, seed=5, n_cells=(3, 4))).generate(test)
    exact = 0
    for text, record in zip(texts, test):
        _, offered = parse_question(record["user_msg"])
        verdict = judge(text, answer_items(record["assistant_msg"]), candidates=offered)
        assert verdict.legitimate and verdict.n_items == verdict.n_distinct == record["n"]
        assert verdict.n_outside == 0 and len(offered) == record["n"] + 2
        exact += verdict.exact
    assert exact / len(test) >= 0.9


def test_celltypist_reference_answers_open_set_puzzles(tmp_path):
    from cellpuzzle_cli.io import read_records
    from cellpuzzle_cli.synthetic import SyntheticSpec, write_synthetic_h5ad

    h5ad = write_synthetic_h5ad(tmp_path / "data" / "atlas.h5ad", SyntheticSpec(
        n_cells=360, n_genes=200, nnz_per_cell=40, n_donors=4, n_cell_types=6, seed=5))
    manifest = tmp_path / "cellpuzzle.json"
    for step in (("build-context", h5ad, "-o", tmp_path / "cells", "--top-genes", "10",
                  "--workers", "1"),
                 ("make-qa", "-o", tmp_path / "puzzles", "--min-n", "3", "--max-n", "4",
                  "--per-n", "4", "--extra-candidates", "2"),
                 ("split", "-o", tmp_path / "splits", "--seed", "0"),
                 ("predict", "--backend", "celltypist", "-o", tmp_path / "ct")):
        result = run_cli(*step, manifest=manifest)
        assert result.code == 0, result.output
    test = {r["puzzle_id"]: r for r in read_records(tmp_path / "splits" / "test.jsonl")}
    for line in read_records(tmp_path / "ct" / "shard-0-of-1.jsonl"):
        _, offered = parse_question(test[line["puzzle_id"]]["user_msg"])
        assert line["n_candidates"] == len(offered) == line["n"] + 2
        verdict = judge(line["prediction"], answer_items(line["answer"]), candidates=offered)
        assert verdict.legitimate and verdict.n_items == verdict.n_distinct == line["n"]
        assert verdict.n_outside == 0


def test_sft_examples_of_open_set_puzzles():
    from cellpuzzle_cli.rationale import build_targets
    from cellpuzzle_cli.sft import sft_examples

    records = open_records(12, seed=7)
    targets, counts = build_targets(records, "template")   # what prepare_examples does
    examples = sft_examples(records, targets)
    assert counts == {"template": 12}   # one reasoning line per cell, not per candidate
    by_user = {r["user_msg"]: r for r in records}
    for ex in examples:
        record = by_user[ex["prompt"][1]["content"]]
        assert ex["prompt"][0]["content"] == OPEN_SYSTEM_PROMPT
        target = ex["completion"][0]["content"]
        assert judge(target, answer_items(record["assistant_msg"])).exact
        assert target.count("\nCell ") == record["n"]
