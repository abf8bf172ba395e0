"""The answer parser and per-prediction metrics, pinned on hand-made texts.

Every case lists what `score` must report for it and what the RL reward must be, so a change
in parsing shows up as a named failing case.
"""

from __future__ import annotations

import random
import re

import pytest

from cellpuzzle_cli.answer import (
    answer_items,
    candidate_answer,
    format_prediction,
    judge,
    parse_answer,
)

GOLD = "B cells | NK cells | T cells"


def tagged(answer: str, think: str = "The cells express markers.") -> str:
    return f"<think>\n{think}\n</think>\n<answer>{answer}</answer>"


# name, prediction, gold, legitimate, correct, exact, uniqueness, reward (cello1 variant)
CASES = [
    ("correct", tagged("B cells | NK cells | T cells"), GOLD, True, 3, True, 1.0, 1.0),
    ("swapped", tagged("NK cells | B cells | T cells"), GOLD, True, 1, False, 1.0, 1 / 6),
    ("upper-case", tagged("B CELLS | nk cells | T Cells"), GOLD, True, 3, True, 1.0, 1.0),
    ("extra item", tagged("B cells | NK cells | T cells | Monocytes"), GOLD, True, 3, False, 1.0, -1.0),
    ("missing item", tagged("B cells | NK cells"), GOLD, True, 2, False, 1.0, -1.0),
    ("duplicate item", tagged("B cells | B cells | T cells"), GOLD, True, 2, False, 2 / 3, -1.0),
    ("duplicate, other case", tagged("B cells | b CELLS | T cells"), GOLD, True, 2, False, 2 / 3,
     1 / 3),   # the cello1 reward repeats Cell-o1's case-sensitive rule: partial credit
    ("missing answer tag", "<think>\nx\n</think>\nB cells | NK cells | T cells", GOLD,
     False, 0, False, 0.0, -1.0),
    ("missing think tag", "<answer>B cells | NK cells | T cells</answer>", GOLD,
     False, 0, False, 0.0, -1.0),
    ("text before tags", "Sure!\n" + tagged("B cells | NK cells | T cells"), GOLD,
     False, 0, False, 0.0, -1.0),
    ("text after tags", tagged("B cells | NK cells | T cells") + "\nHope this helps.", GOLD,
     False, 0, False, 0.0, -1.0),
    ("one final newline is tolerated (as Cell-o1's regex)", tagged(GOLD) + "\n", GOLD,
     True, 3, True, 1.0, 1.0),
    ("two final newlines", tagged(GOLD) + "\n\n", GOLD, False, 0, False, 0.0, -1.0),
    ("tags out of order", "<answer>B cells | NK cells | T cells</answer>\n<think>\nx\n</think>",
     GOLD, False, 0, False, 0.0, -1.0),
    ("think and answer on one line", "<think>x</think><answer>B cells | NK cells | T cells</answer>",
     GOLD, False, 0, False, 0.0, -1.0),
    ("think and answer on one line, with the newline", "<think>x</think>\n<answer>" + GOLD + "</answer>",
     GOLD, True, 3, True, 1.0, 1.0),
    ("extra spaces around items", tagged("   B cells|NK cells   |  T cells   "), GOLD,
     True, 3, True, 1.0, 1.0),
    ("empty items dropped", tagged("B cells || NK cells | T cells |"), GOLD, True, 3, True, 1.0, 1.0),
    ("single-item answer has no '|'", tagged("B cells"), "B cells", False, 0, False, 0.0, -1.0),
    ("empty prediction", "", GOLD, False, 0, False, 0.0, -1.0),
    ("no prediction (None)", None, GOLD, False, 0, False, 0.0, -1.0),
    ("non-ASCII", tagged("ZELLE Α | célula β | 細胞", think="Zellen – ähnlich"), "Zelle α | Célula β | 細胞",
     True, 3, True, 1.0, 1.0),
    ("doubled closing tag", tagged(GOLD) + "</answer>", GOLD, False, 0, False, 0.0, -1.0),
    ("doubled think tag", "<think>\n<think>\nx\n</think>\n<answer>" + GOLD + "</answer>", GOLD,
     False, 0, False, 0.0, -1.0),
    ("answer on the line after <answer>", "<think>\nx\n</think>\n<answer>\n" + GOLD + "\n</answer>",
     GOLD, True, 3, True, 1.0, 1.0),
    ("'<' inside the reasoning", tagged(GOLD, think="p < 0.05 for CD3E <-> NKG7"), GOLD,
     True, 3, True, 1.0, 1.0),
    ("windows line ends", "<think>\r\nx\r\n</think>\n<answer>" + GOLD + "</answer>", GOLD,
     True, 3, True, 1.0, 1.0),
    ("gold as a full answer text", tagged("NK cells | B cells | T cells"), tagged(GOLD),
     True, 1, False, 1.0, 1 / 6),
]


@pytest.mark.parametrize("name,text,gold,legit,correct,exact,uniq,reward", CASES,
                         ids=[c[0] for c in CASES])
def test_metrics_on_hand_made_texts(name, text, gold, legit, correct, exact, uniq, reward):
    v = judge(text, answer_items(gold))
    assert v.legitimate is legit
    assert v.correct == correct
    assert v.exact is exact
    assert v.uniqueness == pytest.approx(uniq)
    assert v.n == len(answer_items(gold))
    assert parse_answer(text).legitimate is legit


def test_candidate_and_items_are_what_a_reader_sees():
    p = parse_answer(tagged("  B cells |NK cells|  T cells "))
    assert p.candidate == "B cells |NK cells|  T cells"
    assert p.items == ["B cells", "NK cells", "T cells"]
    # Without an <answer> tag, the first line with a '|' is the candidate.
    assert candidate_answer("blah\nA | B\nC | D") == "A | B"
    assert candidate_answer("<answer></answer>\nx | y") == "x | y"
    assert candidate_answer("no answer at all") == ""
    assert parse_answer(None) == parse_answer("")


def test_cello1_compat_counts_extra_items_as_exact_and_case_sensitive_uniqueness():
    gold = answer_items(GOLD)
    extra = tagged("B cells | NK cells | T cells | Monocytes")
    assert not judge(extra, gold).exact
    assert judge(extra, gold, cello1_compat=True).exact
    dup = tagged("B cells | b CELLS | T cells")
    assert judge(dup, gold).uniqueness == pytest.approx(2 / 3)
    assert judge(dup, gold, cello1_compat=True).uniqueness == 1.0


def test_gold_answers_in_every_shape():
    assert answer_items("B cells | NK cells") == ["B cells", "NK cells"]
    assert answer_items(tagged("B cells | NK cells")) == ["B cells", "NK cells"]
    assert answer_items(["B cells", " NK cells "]) == ["B cells", "NK cells"]
    assert answer_items(None) == []


def test_format_prediction_round_trips():
    text = format_prediction("Cell 1: CD79A points to B cells.", ["B cells", "NK cells"])
    p = parse_answer(text)
    assert p.legitimate and p.items == ["B cells", "NK cells"]


# -- the fast string checks equal the definition, written literally with a regex ------
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_LEGIT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)


def _spec(text: str, gold: list[str]) -> tuple[bool, int, bool, int]:
    lines = text.splitlines()
    cand = ""
    for line in lines:
        if "<answer>" in line:
            cand = line.split("<answer>", 1)[1].strip()
            if cand.endswith("</answer>"):
                cand = cand[: -len("</answer>")].strip()
            break
    if not cand:
        cand = next((line.strip() for line in lines if "|" in line), "")
    legit = (all(text.count(t) == 1 for t in _TAGS) and _LEGIT.match(text) is not None
             and "|" in cand)
    if not legit:
        return False, 0, False, 0
    items = [s.strip() for s in cand.split("|") if s.strip()]
    correct = sum(a.lower() == b.lower() for a, b in zip(items, gold))
    return True, correct, correct == len(gold) and len(items) == len(gold), len({i.lower() for i in items})


def test_parser_matches_the_literal_definition_on_random_texts():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\n", "\r\n", " ", "|", " | ",
              "B cells", "nk CELLS", "T cells", "x < y", "\u2028", "é", "<", ">"]
    gold = answer_items(GOLD)
    skeleton = ["<think>", "\n", "x", "\n", "</think>", "\n", "<answer>", "B cells", " | ",
                "NK cells", " | ", "T cells", "</answer>"]
    for _ in range(4000):
        if rng.random() < 0.5:
            parts = [rng.choice(pieces) for _ in range(rng.randint(0, 14))]
        else:  # mutate a legitimate text, so legitimate and near-legitimate texts are common
            parts = list(skeleton)
            for _ in range(rng.randint(0, 2)):
                parts.insert(rng.randint(0, len(parts)), rng.choice(pieces))
        text = "".join(parts)
        v = judge(text, gold)
        assert (v.legitimate, v.correct, v.exact, v.n_distinct) == _spec(text, gold), repr(text)
