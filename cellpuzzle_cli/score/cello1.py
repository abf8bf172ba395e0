"""Cell-o1's summary metrics, their "±", standard errors and bootstrap intervals.

`cell_accuracy` = Σcorrect/ΣN, `exact_match`, `format_legitimacy`, `uniqueness` (means over
predictions) and `prediction_length`, each with
- `<metric>_pm`: the "±" Cell-o1's evaluation script prints (sample std of per-prediction
  values for cell accuracy and uniqueness, sqrt(p(1-p)/n) for exact match and format),
- `<metric>_se`: the standard error of the mean, sample std / sqrt(n),
- `<metric>_ci95`: a percentile bootstrap interval over predictions (seeded).

The bootstrap resamples counts of distinct per-prediction outcomes with one multinomial draw
per resample, which is the ordinary resample-with-replacement bootstrap, computed in
O(resamples × distinct outcomes) instead of O(resamples × predictions).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cellpuzzle_cli.score.judging import Judged

METRICS = ("cell_accuracy", "exact_match", "format_legitimacy", "uniqueness")
PM_DEFINITION = {
    "cell_accuracy": "sample std (ddof=1) of per-prediction correct/N, as Cell-o1 prints it",
    "exact_match": "sqrt(p(1-p)/count), as Cell-o1 prints it",
    "format_legitimacy": "sqrt(p(1-p)/count), as Cell-o1 prints it",
    "uniqueness": "sample std (ddof=1) of per-prediction uniqueness, as Cell-o1 prints it",
}


def _sample_std(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def summarise(j: Judged, mask: np.ndarray | None, rng: np.random.Generator,
              resamples: int) -> dict[str, Any]:
    """Metrics, Cell-o1's ±, standard errors and bootstrap intervals for the selected predictions."""
    sel = slice(None) if mask is None else mask
    n, correct = j.n[sel], j.correct[sel]
    exact, legit = j.exact[sel].astype(np.float64), j.legitimate[sel].astype(np.float64)
    uniq, length = j.uniqueness[sel], j.length[sel]
    count = len(n)
    partial = correct / np.maximum(n, 1)
    values = {
        "cell_accuracy": float(correct.sum() / max(int(n.sum()), 1)),
        "exact_match": float(exact.mean()),
        "format_legitimacy": float(legit.mean()),
        "uniqueness": float(uniq.mean()),
    }
    per_prediction = {"cell_accuracy": partial, "exact_match": exact,
                      "format_legitimacy": legit, "uniqueness": uniq}
    out: dict[str, Any] = {"count": count, "cells": int(n.sum())}
    for m in METRICS:
        v = values[m]
        out[m] = v
        if m in ("exact_match", "format_legitimacy"):
            out[f"{m}_pm"] = math.sqrt(v * (1 - v) / count) if count else 0.0
        else:
            out[f"{m}_pm"] = _sample_std(per_prediction[m])
        out[f"{m}_se"] = _sample_std(per_prediction[m]) / math.sqrt(count) if count else 0.0
    out["prediction_length"] = float(length.mean())
    out["prediction_length_se"] = _sample_std(length) / math.sqrt(count) if count else 0.0
    out.update(_bootstrap(n, correct, exact, legit, uniq, rng, resamples))
    return out


def _bootstrap(n: np.ndarray, correct: np.ndarray, exact: np.ndarray, legit: np.ndarray,
               uniq: np.ndarray, rng: np.random.Generator, resamples: int) -> dict[str, list[float]]:
    if resamples <= 0 or len(n) == 0:
        return {}
    # One integer per distinct outcome; the first prediction with that outcome supplies its values.
    _, first, counts = np.unique(_outcome_key(n, correct, exact, legit, uniq), return_index=True,
                                 return_counts=True)
    weights = rng.multinomial(len(n), counts / counts.sum(), size=resamples).astype(np.float64)
    kn, kc = n[first].astype(np.float64), correct[first].astype(np.float64)
    draws = {
        "cell_accuracy": (weights @ kc) / np.maximum(weights @ kn, 1),
        "exact_match": (weights @ exact[first]) / len(n),
        "format_legitimacy": (weights @ legit[first]) / len(n),
        "uniqueness": (weights @ uniq[first]) / len(n),
    }
    return {f"{m}_ci95": [float(x) for x in np.percentile(d, [2.5, 97.5])] for m, d in draws.items()}


def _outcome_key(n: np.ndarray, correct: np.ndarray, exact: np.ndarray, legit: np.ndarray,
                 uniq: np.ndarray) -> np.ndarray:
    """Distinct (n, correct, exact, legit, uniqueness) tuples map to distinct integers."""
    _, uniq_code = np.unique(uniq, return_inverse=True)
    key = n.astype(np.int64)
    for part, size in ((correct, int(correct.max(initial=0)) + 1), (exact, 2), (legit, 2),
                       (uniq_code, int(uniq_code.max(initial=0)) + 1)):
        key = key * size + part.astype(np.int64)
    return key

