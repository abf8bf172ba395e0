"""How an annotation compares with labels known for the query (`--truth-col`).

The column is read only for this, after every label is decided. Cell-level agreement and
macro-F1 over the true types use score's own per-type metrics (labels compared ignoring case,
`unassigned` counting as wrong); beside them, chance: a uniform pick among the candidates, and
always naming the most common true type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cellpuzzle_cli.markers import type_key


def evaluate(truth: Sequence[str | None], predicted: Sequence[str],
             candidates: Sequence[str]) -> dict[str, Any]:
    """Agreement, macro-F1 and chance over the cells with a known label."""
    from cellpuzzle_cli.score.judging import CellPairs
    from cellpuzzle_cli.score.per_type import per_type

    known = [(t, p) for t, p in zip(truth, predicted) if t is not None and str(t).strip()]
    if not known:
        return {"cells": 0}
    gold = [str(t) for t, _ in known]
    pred = [str(p) for _, p in known]
    pairs = CellPairs()
    pairs.add([type_key(t) for t in gold], gold, [type_key(p) for p in pred], None)
    common = Counter(type_key(t) for t in gold).most_common(1)[0][1]
    agree = float(np.mean([type_key(t) == type_key(p) for t, p in zip(gold, pred)]))
    return {"cells": len(gold), "agreement": agree, "macro_f1": per_type(pairs).macro_f1,
            "chance_uniform": 1.0 / max(1, len(candidates)), "chance_majority": common / len(gold)}


def describe(name: str, scores: dict[str, Any]) -> str:
    """One line for the terminal."""
    if not scores.get("cells"):
        return f"{name}: no cell has a known label to compare with."
    return (f"{name}: agreement with the known labels {scores['agreement']:.3f}, macro-F1 "
            f"{scores['macro_f1']:.3f} over {scores['cells']:,} cells (chance: "
            f"{scores['chance_uniform']:.3f} picking uniformly, {scores['chance_majority']:.3f} "
            "always naming the most common type)")
