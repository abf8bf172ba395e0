"""The classical baseline: marker statistics from training puzzles plus a one-to-one assignment."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures import MARKERS, make_records

from cellpuzzle_cli.answer import answer_items, judge, parse_answer
from cellpuzzle_cli.baseline import BaselineBackend, assign
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.markers import MarkerStats


def planted_puzzles(count: int, seed: int) -> list[dict]:
    """Split records of 3 to 6 cells, each listing some of its type's planted markers."""
    return make_records(count, seed, n_cells=(3, 6), id_prefix=f"s{seed}")


@pytest.fixture(scope="module")
def train():
    return planted_puzzles(60, seed=1)


def test_baseline_solves_planted_puzzles_with_legitimate_answers(train):
    test = planted_puzzles(40, seed=2)
    texts = BaselineBackend(train).generate(test)
    verdicts = [judge(t, answer_items(r["assistant_msg"])) for t, r in zip(texts, test)]
    assert all(v.legitimate for v in verdicts)
    assert all(v.n_distinct == v.n_items == v.n for v in verdicts)  # one-to-one
    assert sum(v.exact for v in verdicts) / len(verdicts) >= 0.95


def test_rationale_names_the_planted_markers(train):
    test = planted_puzzles(1, seed=3)
    text = BaselineBackend(train).generate(test)[0]
    assert text.startswith("<think>\n") and "</think>\n<answer>" in text
    first_type = answer_items(test[0]["assistant_msg"])[0]
    assert any(marker in text.splitlines()[1] for marker in MARKERS[first_type])


def test_baseline_is_deterministic(train):
    test = planted_puzzles(10, seed=4)
    assert BaselineBackend(train).generate(test) == BaselineBackend(list(train)).generate(test)


def test_assignment_beats_per_cell_argmax_under_the_one_to_one_rule():
    # Both cells prefer candidate 0 on their own; the joint best gives cell 1 the other one.
    scores = np.array([[-1.0, -5.0], [-1.5, -2.0]])
    assert assign(scores) == [0, 1]
    assert assign(np.zeros((3, 2)))[2] in (0, 1)  # more cells than candidates: no crash


def test_marker_stats_from_puzzle_files_and_full_answers(train):
    # The puzzles format (`question`, `answer`) and full <think>/<answer> gold texts both work.
    as_puzzles = [{"question": r["user_msg"],
                   "answer": f"<think>\nx\n</think>\n<answer>{r['assistant_msg']}</answer>"} for r in train]
    a, b = MarkerStats.fit(train), MarkerStats.fit(as_puzzles)
    assert a.types == b.types and np.array_equal(a.counts, b.counts)
    m = a.score_matrix([["MS4A1", "CD79A", "GENE1"], ["GNLY", "GENE3"]],
                       ["natural killer cell", "b cell", "alien"])
    assert m.shape == (2, 3)
    assert m[0].argmax() == 1 and m[1].argmax() == 0  # types match case-insensitively
    assert set(a.evidence(["GENE1", "CD79B", "MS4A1", "GNLY"], "B cell", k=2)) == {"MS4A1",
                                                                                   "CD79B"}
    assert "GNLY" not in a.evidence(["GENE1", "CD79B", "GNLY"], "B cell", k=3)
    assert not a.knows("alien") and a.knows("B CELL")


def test_fit_refuses_records_without_puzzles():
    with pytest.raises(UserError, match="training puzzle"):
        MarkerStats.fit([{"user_msg": "hello", "assistant_msg": "B cell"}])
    backend = BaselineBackend(planted_puzzles(5, seed=5))
    with pytest.raises(UserError, match="candidate"):
        backend.generate([{"user_msg": "no cells here", "puzzle_id": "x"}])


def test_predictions_parse_as_the_scorer_reads_them(train):
    text = BaselineBackend(train).generate(planted_puzzles(1, seed=6))[0]
    p = parse_answer(text)
    assert p.legitimate and len(p.items) == len(set(p.items))
