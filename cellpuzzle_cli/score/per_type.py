"""Per-type metrics: precision, recall, F1 and support per gold type, macro-F1, confusion matrix.

Cell accuracy hides which types fail. Here every cell is one (gold type, predicted type) pair,
compared case-insensitively. For a gold type t: precision = cells predicted t that are t / cells
predicted t; recall = cells of t predicted t / cells of t (the support); F1 their harmonic mean,
0 where undefined. Macro-F1 is the unweighted mean over gold types. A prediction naming a type
that is no gold type (or none at all) costs recall only, as in scikit-learn's
`precision_recall_fscore_support(labels=gold types, zero_division=0)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cellpuzzle_cli.score.judging import NO_ANSWER, CellPairs

OTHER = "(other answer)"
NONE = "(no answer)"


@dataclass
class PerType:
    """Per-type scores of one run; `confusion` rows are gold types, columns `columns`."""

    types: list[str]
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray
    columns: list[str]

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean()) if self.f1.size else 0.0

    def to_json(self) -> dict[str, Any]:
        rows = [{"type": t, "precision": float(p), "recall": float(r), "f1": float(f),
                 "support": int(s)}
                for t, p, r, f, s in zip(self.types, self.precision, self.recall, self.f1,
                                         self.support)]
        return {"macro_f1": self.macro_f1, "types": rows,
                "confusion": {"rows": self.types, "columns": self.columns,
                              "matrix": self.confusion.tolist()}}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def per_type(cells: CellPairs) -> PerType:
    """Per-type scores from every cell's (gold, predicted) pair."""
    gold, pred = cells.arrays()
    gold_codes = np.unique(gold)
    order = sorted(gold_codes.tolist(), key=lambda c: cells.names[c].lower())
    k = len(order)
    index = np.full(len(cells.names) + 1, k, dtype=np.int64)   # other answers -> column k
    index[np.asarray(order, dtype=np.int64)] = np.arange(k)
    cols = np.where(pred == NO_ANSWER, k + 1, index[np.where(pred == NO_ANSWER, 0, pred)])
    confusion = np.bincount(index[gold] * (k + 2) + cols,
                            minlength=k * (k + 2)).reshape(k, k + 2)
    tp = np.diag(confusion[:, :k]).astype(np.float64)
    predicted = confusion[:, :k].sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support.astype(np.float64))
    f1 = _ratio(2 * precision * recall, precision + recall)
    types = [cells.names[c] for c in order]
    columns = [*types, OTHER, NONE]
    return PerType(types, precision, recall, f1, support, confusion, columns)
