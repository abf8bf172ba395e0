"""Hierarchical metrics over the Cell Ontology: partial credit for a parent or child type.

Exact string match scores "T cell" for "CD4-positive, alpha-beta T cell" like "B cell". Here
every type is the set A(t) of itself and its Cell Ontology ancestors (the root `cell` left out,
see `ontology.CellOntology.ancestors`). Over all cells with a gold term:

- hierarchical precision hP = Σ|A(pred) ∩ A(gold)| / Σ|A(pred)|,
- hierarchical recall    hR = Σ|A(pred) ∩ A(gold)| / Σ|A(gold)|,
- hF = 2·hP·hR / (hP + hR);

a cell without an answer, or whose answer has no term, adds to hR's denominator only. Each cell
is also put in one class: `gold` (same term), `ancestor` (the answer is a more general type of
the gold one), `descendant` (more specific), `unrelated` (neither, siblings included),
`unmapped` (the answer's label has no known term) or `no_answer`; the shares sum to 1.

Labels get terms from the records' `cell_type_ids`, then from a label→ID table the user gives,
then from an exact (case-insensitive) Cell Ontology label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.ontology import CL_ROOT, CellOntology, is_term_id
from cellpuzzle_cli.score.judging import NO_ANSWER, CellPairs

RELATIONS = ("gold", "ancestor", "descendant", "unrelated", "unmapped", "no_answer")


@dataclass
class Hierarchical:
    """Hierarchical scores of one run, or why there are none (`omitted`)."""

    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0
    cells: int = 0
    shares: dict[str, float] | None = None
    source: str = ""
    omitted: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.omitted is not None:
            return {"omitted": self.omitted}
        return {"hierarchical_precision": self.precision, "hierarchical_recall": self.recall,
                "hierarchical_f1": self.f1, "cells": self.cells, "relations": self.shares,
                "ontology": self.source}


def read_label_ids(path: Path) -> dict[str, str]:
    """A two-column TSV `label<TAB>term ID` (a header line is allowed) as lower label → ID."""
    path = existing_path(path, "label-to-ID table")
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 2 or not is_term_id(parts[1]):
            if number == 1 and len(parts) >= 2:
                continue   # a header such as `label<TAB>cell_type_ontology_term_id`
            raise UserError(f"{path}, line {number}: expected `label<TAB>term ID` (e.g. "
                            f"`B cells\tCL:0000236`), got {line!r}. Fix that line.")
        out[parts[0].lower()] = parts[1]
    return out


def _term_of(cells: CellPairs, extra: dict[str, str], onto: CellOntology) -> list[str | None]:
    """Each vocabulary label's term: record IDs, then the user's table, then CL labels."""
    terms: list[str | None] = []
    for key in cells.codes:
        term = cells.term_ids.get(key) or extra.get(key) or onto.id_for_label(key)
        terms.append(term if term and onto.knows(term) else None)
    return terms


def hierarchical(cells: CellPairs, label_ids: dict[str, str] | None = None,
                 onto: CellOntology | None = None) -> Hierarchical:
    """Hierarchical metrics of one run; `omitted` says why when its gold types have no terms.

    `onto` defaults to the shipped Cell Ontology (tests pass a hand-checked fragment).
    """
    extra = label_ids or {}
    gold, pred = cells.arrays()
    if not cells.term_ids and not extra:
        return Hierarchical(omitted="the gold answers carry no Cell Ontology IDs (no "
                                    "`cell_type_ids` in the predictions or the --reference); "
                                    "pass --label-ids TSV to map labels to CL terms")
    onto = onto or CellOntology.load()
    terms = _term_of(cells, extra, onto)
    gold_term = np.array([terms[g] is not None for g in range(len(terms))], dtype=bool)
    keep = gold_term[gold]
    if not keep.any():
        return Hierarchical(omitted="none of the gold types maps to a known Cell Ontology term")
    pairs, counts = np.unique(np.stack([gold[keep], pred[keep]]), axis=1, return_counts=True)
    overlap = pred_size = gold_size = 0
    classes = dict.fromkeys(RELATIONS, 0)
    for (g, p), count in zip(pairs.T.tolist(), counts.tolist()):
        g_set = onto.ancestors(terms[g])
        gold_size += count * len(g_set)
        p_term = terms[p] if p != NO_ANSWER else None
        if p_term is None:
            classes["no_answer" if p == NO_ANSWER else "unmapped"] += count
            continue
        p_set = onto.ancestors(p_term)
        overlap += count * len(g_set & p_set)
        pred_size += count * len(p_set)
        classes[_relation(terms[g], p_term, g_set, p_set)] += count
    precision = overlap / pred_size if pred_size else 0.0
    recall = overlap / gold_size if gold_size else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = int(counts.sum())
    return Hierarchical(precision, recall, f1, total,
                        {k: v / total for k, v in classes.items()}, onto.source)


def _relation(gold: str, pred: str, gold_set: frozenset[str], pred_set: frozenset[str]) -> str:
    if gold == pred:
        return "gold"
    if pred in gold_set or pred == CL_ROOT:
        return "ancestor"
    if gold in pred_set:
        return "descendant"
    return "unrelated"
