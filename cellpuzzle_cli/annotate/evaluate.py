"""How an annotation compares with labels known for the query (`--truth-col`).

The column is read only for this, after every label is decided, as build-context reads labels
(`label_policy`): white space and Unicode tidied, and an empty label or a spelling of a missing
value (nan, none, NA, ...) is no label, so its cells are left out. Cell-level agreement and
macro-F1 over the true types use score's own per-type metrics (labels compared ignoring case,
`unassigned` counting as wrong); beside them, chance: a uniform pick among the candidates, and
always naming the most common true type. Known labels that name no candidate are counted (with
examples): a cell can never agree there, and when most do the column is likely the wrong one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from cellpuzzle_cli.markers import type_key

_EXAMPLES = 3


def known_label(label: str | None) -> str | None:
    """The label as build-context would read it, or None where it means "not known"."""
    from cellpuzzle_cli.build_context.label_policy import MISSING_SPELLINGS, tidy

    if label is None:
        return None
    text = tidy(str(label))
    return text if text and text.lower() not in MISSING_SPELLINGS else None


def evaluate(truth: Sequence[str | None], predicted: Sequence[str],
             candidates: Sequence[str]) -> dict[str, Any]:
    """Agreement, macro-F1 and chance over the cells with a known label."""
    from cellpuzzle_cli.score.judging import CellPairs
    from cellpuzzle_cli.score.per_type import per_type

    labels = [known_label(t) for t in truth]
    known = [(t, str(p)) for t, p in zip(labels, predicted) if t is not None]
    if not known:
        return {"cells": 0, "no_label": len(labels)}
    gold = [t for t, _ in known]
    pred = [p for _, p in known]
    pairs = CellPairs()
    pairs.add([type_key(t) for t in gold], gold, [type_key(p) for p in pred], None)
    common = Counter(type_key(t) for t in gold).most_common(1)[0][1]
    agree = float(np.mean([type_key(t) == type_key(p) for t, p in zip(gold, pred)]))
    offered = {type_key(c) for c in candidates}
    outside = Counter(t for t in gold if type_key(t) not in offered)
    return {"cells": len(gold), "agreement": agree, "macro_f1": per_type(pairs).macro_f1,
            "chance_uniform": 1.0 / max(1, len(candidates)), "chance_majority": common / len(gold),
            "no_label": len(labels) - len(gold), "not_candidates": sum(outside.values()),
            "not_candidates_examples": [t for t, _ in outside.most_common(_EXAMPLES)]}


def describe(name: str, scores: dict[str, Any]) -> str:
    """One line for the terminal."""
    if not scores.get("cells"):
        return f"{name}: no cell has a known label to compare with."
    line = (f"{name}: agreement with the known labels {scores['agreement']:.3f}, macro-F1 "
            f"{scores['macro_f1']:.3f} over {scores['cells']:,} cells (chance: "
            f"{scores['chance_uniform']:.3f} picking uniformly, {scores['chance_majority']:.3f} "
            "always naming the most common type)")
    if scores.get("no_label"):
        line += f"; {scores['no_label']:,} cells without a known label left out"
    return line


def mismatch_warning(name: str, column: str, scores: dict[str, Any]) -> str | None:
    """A warning when most known labels name no candidate, so agreement means little."""
    outside = scores.get("not_candidates", 0)
    if not scores.get("cells") or outside * 2 <= scores["cells"]:
        return None
    examples = ", ".join(repr(t) for t in scores["not_candidates_examples"])
    return (f"{name}: {outside:,} of the {scores['cells']:,} known labels in '{column}' name no "
            f"candidate type (e.g. {examples}), so those cells cannot agree and the agreement "
            "above says little. Check that --truth-col is the column of cell type names, spelled "
            "as the reference's types.")
