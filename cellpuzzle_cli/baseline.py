"""The classical baseline an LLM has to beat: marker-gene likelihoods plus a one-to-one assignment.

It learns `MarkerStats` from training puzzles only, scores every (cell, candidate) pair by
smoothed log-likelihood and solves the puzzle's constraint (each cell one candidate, no candidate
twice) with the Hungarian algorithm. On an open-set puzzle (more candidates than cells) the
matrix is rectangular and `linear_sum_assignment` still gives each cell a distinct candidate,
leaving the worst-fitting candidates unused. Its output is an ordinary prediction text, so
`score` reads it like any model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from cellpuzzle_cli.answer import format_prediction
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.markers import DEPTHS, MarkerStats
from cellpuzzle_cli.prompts import parse_question, record_question


def assign(scores: np.ndarray) -> list[int]:
    """Candidate index for each cell maximising the total score, each candidate used at most once.

    With more candidates than cells (open set), some candidates go unused; with more cells
    than candidates, cells left over take their best candidate.
    """
    from scipy.optimize import linear_sum_assignment

    n_cells, n_cand = scores.shape
    choice = [int(j) for j in np.argmax(scores, axis=1)] if n_cand else [-1] * n_cells
    if n_cells and n_cand:
        rows, cols = linear_sum_assignment(scores, maximize=True)
        for r, c in zip(rows, cols):
            choice[int(r)] = int(c)
    return choice


class BaselineBackend:
    """`predict --backend baseline`: deterministic, CPU-only, trained on the train split."""

    name = "baseline"
    model = "marker-likelihood+hungarian"

    def __init__(self, train_records: Iterable[dict[str, Any]] | None = None,
                 stats: MarkerStats | None = None, depths: Sequence[int] = DEPTHS,
                 prior: float = 20.0, alpha: float = 0.5, evidence_genes: int = 3):
        if stats is None:
            if train_records is None:
                raise UserError("The baseline needs training puzzles (--train FILE) to learn marker "
                                "genes from.")
            stats = MarkerStats.fit(train_records, depths=depths, prior=prior, alpha=alpha)
        self.stats = stats
        self.evidence_genes = evidence_genes

    def solve(self, question: str) -> tuple[list[list[str]], list[str], list[int]]:
        cells, candidates = parse_question(question)
        if not cells or not candidates:
            raise UserError("A puzzle's question has no `Cell i: genes` lines or no candidate list, "
                            "so the baseline cannot read it. Check that the file holds puzzles "
                            "made by `cellpuzzle make-qa`/`split` (field `user_msg`).")
        return cells, candidates, assign(self.stats.score_matrix(cells, candidates))

    def explain(self, cells: Sequence[Sequence[str]], candidates: Sequence[str],
                choice: Sequence[int]) -> str:
        lines = []
        for i, (genes, j) in enumerate(zip(cells, choice), 1):
            cell_type = candidates[j]
            ev = self.stats.evidence(genes, cell_type, self.evidence_genes)
            why = f"{', '.join(ev)} point to {cell_type}" if ev else \
                f"no strong marker; {cell_type} fits best by elimination"
            lines.append(f"Cell {i}: {why}.")
        return "\n".join(lines)

    def predict_one(self, record: dict[str, Any]) -> str:
        cells, candidates, choice = self.solve(record_question(record))
        items = [candidates[j] for j in choice]
        return format_prediction(self.explain(cells, candidates, choice), items)

    def generate(self, records: Sequence[dict[str, Any]],
                 progress: Callable[..., None] | None = None) -> list[str]:
        """Full prediction texts `<think>…</think>\\n<answer>t1 | … | tN</answer>`, in order."""
        out = []
        for record in records:
            out.append(self.predict_one(record))
            if progress is not None:
                progress(1)
        return out
