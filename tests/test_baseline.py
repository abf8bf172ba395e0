"""The classical baseline: marker statistics from training puzzles plus a one-to-one assignment."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cellpuzzle_cli.answer import answer_items, format_answer, judge, parse_answer
from cellpuzzle_cli.baseline import BaselineBackend, assign
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.markers import MarkerStats
from cellpuzzle_cli.prompts import SYSTEM_PROMPT, format_question

TYPES = ["B cell", "T cell", "NK cell", "monocyte", "platelet", "dendritic cell"]


def planted_puzzles(count: int, seed: int, noise: int = 12, markers: int = 3) -> list[dict]:
    """Split records whose cells list their type's planted markers among shared noise genes."""
    rng = random.Random(seed)
    records = []
    for k in range(count):
        n = rng.randint(3, len(TYPES))
        types = rng.sample(TYPES, n)
        cells = []
        for t in types:
            genes = [f"{t.split()[0].upper()}_M{i}" for i in range(markers)]
            genes += [f"HK{rng.randrange(40)}" for _ in range(noise)]
            rng.shuffle(genes)
            cells.append(genes)
        candidates = sorted(types, key=lambda _: rng.random())
        records.append({"system_msg": SYSTEM_PROMPT,
                        "user_msg": format_question("Donor: 40-year-old female.", cells, candidates),
                        "assistant_msg": format_answer(types), "puzzle_id": f"s{seed}-{k}", "n": n})
    return records


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
    assert BaselineBackend.name == "baseline"


def test_rationale_names_the_planted_markers(train):
    test = planted_puzzles(1, seed=3)
    text = BaselineBackend(train).generate(test)[0]
    assert text.startswith("<think>\n") and "</think>\n<answer>" in text
    first_type = answer_items(test[0]["assistant_msg"])[0]
    assert f"{first_type.split()[0].upper()}_M" in text.splitlines()[1]


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
    m = a.score_matrix([["B_M0", "B_M1", "HK1"], ["NK_M2", "HK3"]], ["NK cell", "b cell", "alien"])
    assert m.shape == (2, 3)
    assert m[0].argmax() == 1 and m[1].argmax() == 0  # types match case-insensitively
    assert set(a.evidence(["HK1", "B_M2", "B_M0", "NK_M1"], "B cell", k=2)) == {"B_M0", "B_M2"}
    assert "NK_M1" not in a.evidence(["HK1", "B_M2", "NK_M1"], "B cell", k=3)
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
