"""The one answer parser: what a model answered, whether its layout is legitimate, how it scores.

`score`, the verl/TRL reward, the baseline and SFT all read answers through this module, so
they can never disagree. The rules follow Cell-o1's evaluation script (arXiv 2506.02911):

- Candidate answer: the text after the first `<answer>` on its line, one trailing `</answer>`
  removed; when that is empty, the first line containing `|`.
- Legitimate layout: exactly one each of `<think>`, `</think>`, `<answer>`, `</answer>`; the
  text is `<think>…</think>\\n<answer>…</answer>` and nothing else (one final newline is
  tolerated, as Cell-o1's `re.match(…$)` tolerates it); the candidate contains `|`.
- Items: split on `|`, stripped, empties dropped, compared case-insensitively by position.
- Candidates (open-set puzzles, where the gold answer does not name them all): when given to
  `judge`, items outside them are counted, and the reward is −1 for any.

The checks use plain string operations rather than a regex: `score` parses hundreds of
thousands of predictions per second, and with each tag present exactly once, "starts with
`<think>`, contains `</think>\\n<answer>`, ends with `</answer>`" is the same test as the regex.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
ANSWER_SEPARATOR = " | "
_JOIN = THINK_CLOSE + "\n" + ANSWER_OPEN


@dataclass(frozen=True)
class ParsedAnswer:
    """A model's text read as an answer."""

    legitimate: bool
    items: list[str]
    candidate: str


@dataclass(frozen=True)
class Verdict:
    """One prediction judged against its gold answer (the per-prediction view of `score`).

    `n` is the number of gold items; `correct` counts positional case-insensitive matches;
    `n_items`/`n_distinct` describe the predicted items (0 when illegitimate); `n_outside`
    counts items that are none of the puzzle's candidates (0 when they were not given).
    """

    legitimate: bool
    n: int
    correct: int
    exact: bool
    n_items: int
    n_distinct: int
    n_outside: int = 0

    @property
    def uniqueness(self) -> float:
        return self.n_distinct / self.n_items if self.legitimate and self.n_items else 0.0


def _first_line(text: str) -> str:
    """Text up to the first line break, with `str.splitlines` deciding what a line break is."""
    parts = text.partition("\n")[0].splitlines()
    return parts[0] if parts else ""


def candidate_answer(text: str) -> str:
    """The answer text a human would read off the prediction (see the module docstring)."""
    i = text.find(ANSWER_OPEN)
    if i >= 0:
        cand = _first_line(text[i + len(ANSWER_OPEN):]).strip()
        if cand.endswith(ANSWER_CLOSE):
            cand = cand[: -len(ANSWER_CLOSE)].strip()
        if cand:
            return cand
    if "|" not in text:
        return ""
    for line in text.splitlines():
        if "|" in line:
            return line.strip()
    return ""


def is_legitimate(text: str, candidate: str | None = None) -> bool:
    """Cell-o1's format check: one of each tag, nothing outside them, a `|` in the candidate."""
    if (text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1
            or text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1):
        return False
    if not text.startswith(THINK_OPEN) or _JOIN not in text:
        return False
    if not (text.endswith((ANSWER_CLOSE, ANSWER_CLOSE + "\n"))):
        return False
    if candidate is None:
        candidate = candidate_answer(text)
    return "|" in candidate


def split_items(candidate: str) -> list[str]:
    """`"a | b ||c "` -> `["a", "b", "c"]`."""
    return [s for s in map(str.strip, candidate.split("|")) if s]


def parse_answer(text: str | None) -> ParsedAnswer:
    """Candidate, items and format legitimacy of a model's text (`None` reads as empty)."""
    text = text or ""
    candidate = candidate_answer(text)
    return ParsedAnswer(is_legitimate(text, candidate), split_items(candidate), candidate)


def answer_items(answer: str | Sequence[str] | None) -> list[str]:
    """Items of a gold answer: a plain `"t1 | t2"`, a full `<think>/<answer>` text, or a list."""
    if answer is None:
        return []
    if not isinstance(answer, str):
        return [str(a).strip() for a in answer if str(a).strip()]
    if ANSWER_OPEN in answer:
        return split_items(candidate_answer(answer))
    return split_items(answer)


def _answer_candidate_fast(text: str) -> str | None:
    """Candidate of a text that holds exactly four `<` (the common, tag-only case), or None.

    With only four `<`, the text is legitimate iff `<think>` opens it, the first `<` after it
    starts `</think>\n<answer>` and `</answer>` closes it; then every tag occurs exactly once.
    Returns "" for such a text that is not legitimate, None when the general path must decide.
    """
    if not text.startswith(THINK_OPEN) or text.count("<") != 4:
        return None
    j = text.find("<", len(THINK_OPEN))
    if not text.startswith(_JOIN, j) or not (
            text.endswith((ANSWER_CLOSE, ANSWER_CLOSE + "\n"))):
        return ""
    cand = _first_line(text[j + len(_JOIN):]).strip()
    if cand.endswith(ANSWER_CLOSE):
        cand = cand[: -len(ANSWER_CLOSE)].strip()
    return cand or None


def answer_items_lower(answer: str | Sequence[str] | None) -> list[str]:
    """`answer_items` lower-cased (for case-insensitive comparison)."""
    if isinstance(answer, str) and ANSWER_OPEN not in answer:
        return split_items(answer.lower())
    return [g.lower() for g in answer_items(answer)]


def judge_tuple(prediction: str | None, gold: Sequence[str],
                cello1_compat: bool = False) -> tuple[bool, int, bool, int, int]:
    """`(legitimate, correct, exact, n_items, n_distinct)`: `judge` without the object."""
    return judge_lowered(prediction or "", [g.lower() for g in gold], cello1_compat)


def judge_lowered(text: str, gold_lower: list[str],
                  cello1_compat: bool = False) -> tuple[bool, int, bool, int, int]:
    """`judge_tuple` for gold items already lower-cased: the inner loop of `score`."""
    return judge_items(text, gold_lower, cello1_compat)[0]


def judge_items(text: str, gold_lower: list[str], cello1_compat: bool = False
                ) -> tuple[tuple[bool, int, bool, int, int], list[str]]:
    """`judge_lowered` plus the lower-cased predicted items ([] when illegitimate).

    Per-type and hierarchical metrics need the items themselves, not only the counts.
    Lower-casing the whole candidate before splitting equals lower-casing each item: `|` and
    whitespace are neither cased nor case-ignorable, so no letter's context changes.
    """
    candidate = _answer_candidate_fast(text)
    if candidate is None:
        candidate = candidate_answer(text)
        if not is_legitimate(text, candidate):
            return (False, 0, False, 0, 0), []
    elif "|" not in candidate:
        return (False, 0, False, 0, 0), []
    lowered = [s for s in map(str.strip, candidate.lower().split("|")) if s]
    n = len(gold_lower)
    correct = sum(map(str.__eq__, lowered, gold_lower))
    if cello1_compat:
        distinct = len({s for s in map(str.strip, candidate.split("|")) if s})
        return (True, correct, n > 0 and correct == n, len(lowered), distinct), lowered
    exact = n > 0 and correct == n and len(lowered) == n
    return (True, correct, exact, len(lowered), len(set(lowered))), lowered


def judge(prediction: str | None, gold: Sequence[str], cello1_compat: bool = False,
          candidates: Sequence[str] | None = None) -> Verdict:
    """Score one prediction against the gold items.

    Exact needs as many items as gold and all matching; `cello1_compat` reproduces Cell-o1's
    script instead (extra items still count as exact, uniqueness is case-sensitive). With
    `candidates`, items that are none of them (case aside) are counted in `n_outside`.
    """
    (legitimate, correct, exact, n_items, n_distinct), items = judge_items(
        prediction or "", [g.lower() for g in gold], cello1_compat)
    allowed = None if candidates is None else {str(c).lower() for c in candidates}
    outside = 0 if allowed is None else sum(item not in allowed for item in items)
    return Verdict(legitimate, len(gold), correct, exact, n_items, n_distinct, outside)


REWARD_VARIANTS = ("cello1", "partial", "exact")
DEFAULT_VARIANT = "cello1"


def check_variant(variant: str) -> str:
    if variant not in REWARD_VARIANTS:
        raise ValueError(f"Unknown reward variant {variant!r}; use one of {', '.join(REWARD_VARIANTS)}.")
    return variant


def reward_from_verdict(v: Verdict, variant: str = DEFAULT_VARIANT) -> float:
    """Reward of a judged prediction.

    −1 when the layout is illegitimate, the item count differs from N (the cells, not the
    candidates: an open-set puzzle offers more), an item repeats (case-insensitive), or an item
    is none of the puzzle's candidates (when the verdict knew them); otherwise `cello1`:
    (correct/N + exact)/2, `partial`: correct/N, `exact`: 1 or 0.
    """
    check_variant(variant)
    if (not v.legitimate or v.n_items != v.n or v.n_distinct != v.n_items or v.n == 0
            or v.n_outside):
        return -1.0
    if variant == "cello1":
        return (v.correct / v.n + float(v.exact)) / 2.0
    if variant == "partial":
        return v.correct / v.n
    return float(v.exact)


def record_answer(record: dict[str, Any]) -> Any:
    """The gold answer of a record: `answer` (our puzzles, predictions) or `assistant_msg`."""
    return record.get("answer") if record.get("answer") is not None else record.get("assistant_msg")


def format_answer(cell_types: Sequence[str]) -> str:
    """The plain gold answer, `t1 | t2 | … | tN` (puzzles, splits, RL ground truth)."""
    return ANSWER_SEPARATOR.join(cell_types)


def format_prediction(think: str, items: Sequence[str]) -> str:
    """A legitimate answer text: `<think>\\n…\\n</think>\\n<answer>t1 | … | tN</answer>`."""
    return f"{THINK_OPEN}\n{think.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}{format_answer(items)}{ANSWER_CLOSE}"


def unreadable_warning(what: str, total: int, bad: int, example: str | None) -> str | None:
    """When most of `total` answers are not in the answer format, say so with one of them:
    every metric of such a run is 0 because nothing could be read, not because the model
    knows nothing (e.g. a model that answers only newlines)."""
    if total == 0 or bad * 2 <= total:
        return None
    shown = repr((example or "")[:120]) + ("…" if example and len(example) > 120 else "")
    return (f"{what}: {bad:,} of {total:,} answers are not in the answer format "
            f"`<think>…</think>\\n<answer>t1 | t2 | …</answer>`, so nothing could be read from "
            f"them; e.g. {shown}. Their scores are 0 because the model does not answer in the "
            "format (train it longer, or check its chat template), not a measure of what it knows.")
