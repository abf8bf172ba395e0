"""Annotation by many puzzles: a trained model's answers become votes for each cluster's type.

A model was trained on puzzles (N cells, N or N + K candidates, each cell one type), not on
"name this cluster". So each cluster of the query appears in many puzzles, as one of its cells,
with random companions from other clusters, in random order, and with a random candidate list
drawn from the types on offer. The model's answer for that cell is one vote. A model that keeps
to the candidates can only choose a type on offer, so what counts is how often a type is chosen
when it could have been:

    share(cluster, type) = chosen(cluster, type) / (offered(cluster, type) + chosen unoffered)

A model that names the type it believes in even when it is not on offer (a small model trained
only on puzzles whose candidates always fit) still votes: an item naming any known type counts.
The cluster's label is its type of highest share: a cluster of a type absent from the
candidates scatters its votes, and no share stands out. Answers that cannot be read (no
`<answer>` with one known type per cell) are no votes, and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellpuzzle_cli.answer import parse_answer
from cellpuzzle_cli.prompts import format_question, system_prompt

PUZZLE_PREFIX = "annotate"


@dataclass(frozen=True)
class PuzzleShape:
    """Cells per puzzle and candidates per puzzle (more than cells: an open-set puzzle)."""

    cells: int
    candidates: int


def vote_puzzles(cells_by_cluster: Mapping[str, Sequence[Sequence[str]]],
                 candidates: Sequence[str], shape: PuzzleShape, rounds: int, seed: int,
                 context: str = "", system_msg: str | None = None) -> list[dict[str, Any]]:
    """Puzzles in the split format (`system_msg`, `user_msg`, `puzzle_id`, `n`) plus the
    cluster of each cell (`clusters`) and the types offered (`candidates`).

    Each round deals every cluster into one puzzle (the last puzzle of a round is topped up
    with other clusters), one random cell of it each time, so every cluster gets `rounds`
    votes' worth of puzzles. Fewer clusters than cells per puzzle: puzzles as large as the
    clusters allow."""
    rng = np.random.default_rng(seed)
    clusters = sorted(cells_by_cluster)
    n = min(shape.cells, len(clusters))
    m = min(max(shape.candidates, n), len(candidates))
    n = min(n, m)
    records = []
    for r in range(rounds):
        order = list(rng.permutation(len(clusters)))
        groups = [order[i:i + n] for i in range(0, len(order), n)]
        if len(groups[-1]) < n:
            rest = [c for c in order if c not in groups[-1]]
            groups[-1] += list(rng.choice(rest, n - len(groups[-1]), replace=False))
        for g, members in enumerate(groups):
            chosen = [clusters[int(i)] for i in members]
            cells = [_one_cell(cells_by_cluster[c], rng) for c in chosen]
            offered = [candidates[int(i)] for i in rng.choice(len(candidates), m, replace=False)]
            puzzle_id = f"{PUZZLE_PREFIX}:r{r:03d}:p{g:04d}"
            records.append({
                "system_msg": system_msg or system_prompt(n, m),
                "user_msg": format_question(context, cells, offered),
                "assistant_msg": None, "puzzle_id": puzzle_id, "n": n,
                "clusters": chosen, "candidates": offered})
    return records


def _one_cell(cells: Sequence[Sequence[str]], rng: np.random.Generator) -> list[str]:
    return list(cells[int(rng.integers(len(cells)))])


@dataclass
class Votes:
    """What the answers said, cluster by candidate type."""

    clusters: list[str]
    types: list[str]
    chosen: np.ndarray      # (clusters, types): times the model gave this cluster this type
    offered: np.ndarray     # (clusters, types): times the type was on offer (or named anyway)
    answered: int = 0       # puzzles whose answer could be read
    unreadable: int = 0     # puzzles whose answer could not (no votes from them)
    reasons: dict[tuple[str, int], str] = field(default_factory=dict)  # (cluster, type) -> a
                                                                       # line of the model's

    def reason_for_best(self) -> dict[str, str]:
        """Per cluster, a line of the model's reasoning from an answer that chose its best type."""
        best = self.shares().argmax(axis=1)
        return {c: self.reasons.get((c, int(t)), "") for c, t in zip(self.clusters, best)}

    def shares(self) -> np.ndarray:
        """chosen / offered (0 where never offered): the scores a decision is taken on."""
        return np.divide(self.chosen, self.offered, out=np.zeros_like(self.chosen, dtype=float),
                         where=self.offered > 0)


def tally(records: Sequence[dict[str, Any]], predictions: Mapping[str, str | None],
          clusters: Sequence[str], types: Sequence[str]) -> Votes:
    """Votes from the model's answers (`predictions`: puzzle id -> text)."""
    index = {c: i for i, c in enumerate(clusters)}
    by_name = {t.lower(): j for j, t in enumerate(types)}
    votes = Votes(list(clusters), list(types), np.zeros((len(clusters), len(types))),
                  np.zeros((len(clusters), len(types))))
    for record in records:
        text = predictions.get(record["puzzle_id"])
        offered = [by_name[t.lower()] for t in record["candidates"]]
        picks = [by_name.get(item.lower()) for item in parse_answer(text).items]
        if len(picks) != len(record["clusters"]) or any(p is None for p in picks):
            votes.unreadable += 1
            continue
        votes.answered += 1
        for position, (cluster, pick) in enumerate(zip(record["clusters"], picks)):
            row = index[cluster]
            votes.offered[row, offered] += 1
            if pick not in offered:
                votes.offered[row, pick] += 1
            votes.chosen[row, pick] += 1
            votes.reasons.setdefault((cluster, pick), _reason(text, position + 1))
    return votes


def _reason(text: str | None, cell: int) -> str:
    """The model's line about `Cell {cell}` in its <think> block, else its first line."""
    think = (text or "").partition("</think>")[0].replace("<think>", "")
    lines = [ln.strip() for ln in think.splitlines() if ln.strip()]
    mine = next((ln for ln in lines if ln.lower().startswith(f"cell {cell}")), None)
    return (mine or (lines[0] if lines else ""))[:160]
