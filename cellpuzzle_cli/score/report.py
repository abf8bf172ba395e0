"""One `Report` per run, composed from the metric families (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellpuzzle_cli.errors import UserError, existing_path
from cellpuzzle_cli.score.cello1 import PM_DEFINITION, summarise
from cellpuzzle_cli.score.chance import chance
from cellpuzzle_cli.score.hierarchy import Hierarchical, hierarchical, read_label_ids
from cellpuzzle_cli.score.judging import Judged, judge_run, tokenizer_lengths
from cellpuzzle_cli.score.per_type import PerType, per_type
from cellpuzzle_cli.score.runs import RunInput, load_reference


@dataclass
class Report:
    """The scores of one run: `overall` and `by_n` map metric names to numbers."""

    name: str
    overall: dict[str, Any]
    by_n: dict[int, dict[str, Any]]
    files: list[str]
    errors: int
    missing: list[str] | None = None
    length_unit: str = "whitespace words"
    cello1_compat: bool = False
    bootstrap: dict[str, int] = field(default_factory=dict)
    per_type: PerType | None = None
    hierarchical: Hierarchical | None = None
    missing_shards: list[str] = field(default_factory=list)  # a partial run (score --partial)
    limited: dict[str, Any] | None = None   # a partial run: answered, of, limit (predict --limit)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.overall)
        out["overall"] = self.overall
        out["by_n"] = {str(k): v for k, v in sorted(self.by_n.items())}
        out["errors"] = self.errors
        out["prediction_length_unit"] = self.length_unit
        out["cello1_compat"] = self.cello1_compat
        out["pm_definition"] = PM_DEFINITION
        out["bootstrap"] = self.bootstrap
        out["inputs"] = self.files
        if self.missing is not None:
            out["missing"] = self.missing
            out["missing_count"] = len(self.missing)
        if self.per_type is not None:
            out["per_type"] = self.per_type.to_json()
        if self.hierarchical is not None:
            out["hierarchical"] = self.hierarchical.to_json()
        if self.missing_shards or self.limited:
            out["partial"] = {**({"missing_shards": self.missing_shards}
                                 if self.missing_shards else {}), **(self.limited or {})}
        return out


def report(j: Judged, resamples: int = 1000, seed: int = 0, cello1_compat: bool = False,
           length_unit: str = "whitespace words",
           reference: dict[str, dict[str, Any]] | None = None,
           label_ids: dict[str, str] | None = None) -> Report:
    """Every metric family for one judged run: overall, per N, per type and over the ontology."""
    rng = np.random.default_rng(seed)
    overall = summarise(j, None, rng, resamples)
    overall["errors"] = j.errors
    offered = j.n if j.n_candidates is None else j.n_candidates
    overall.update(chance(j.n, offered))
    _add_gaps(overall)
    by_n = {}
    for value in np.unique(j.n):
        mask = j.n == value
        by_n[int(value)] = summarise(j, mask, np.random.default_rng([seed, int(value)]), resamples)
        by_n[int(value)].update(chance(j.n[mask], offered[mask]))
        _add_gaps(by_n[int(value)])
    missing = None
    if reference is not None:
        have = {p for p in j.puzzle_ids if p is not None}
        missing = sorted(pid for pid in reference if pid not in have)
    types = per_type(j.cells) if j.cells is not None else None
    tree = hierarchical(j.cells, label_ids) if j.cells is not None else None
    return Report(j.name, overall, by_n, [str(f) for f in j.files], j.errors, missing, length_unit,
                  cello1_compat, {"resamples": resamples, "seed": seed}, types, tree)


def _add_gaps(metrics: dict[str, Any]) -> None:
    """How far from every puzzle solved (1 − exact match), the run's and chance's: the share of
    puzzles still to win, which reads across N where exact match itself falls with N."""
    metrics["gap_to_optimum"] = 1.0 - metrics["exact_match"]
    metrics["chance_gap_to_optimum"] = 1.0 - metrics["chance_exact_match"]


@dataclass
class ScoreResult:
    reports: list[Report]
    length_unit: str

    def to_json(self) -> dict[str, Any]:
        if len(self.reports) == 1:
            return self.reports[0].to_json()
        return {r.name: r.to_json() for r in self.reports}


def score_runs(runs: Sequence[RunInput], cello1_compat: bool = False,
               tokenizer: Path | None = None, reference: Path | None = None,
               resamples: int = 1000, seed: int = 0,
               label_ids: Path | None = None) -> ScoreResult:
    """Judge and summarise each run; `label_ids` maps labels to CL terms (a TSV)."""
    lengths = tokenizer_lengths(tokenizer) if tokenizer is not None else None
    unit = f"tokens ({Path(tokenizer).name} tokenizer)" if tokenizer is not None else "whitespace words"
    ref = load_reference(existing_path(reference, "reference file")) if reference is not None else None
    table = read_label_ids(label_ids) if label_ids is not None else None
    reports = []
    for run in runs:
        j = judge_run(run.name, run.files, cello1_compat, lengths, ref, run.strict)
        if ref is not None and not any(pid in ref for pid in j.puzzle_ids):
            raise UserError(f"None of the {len(j.puzzle_ids)} predictions of run '{run.name}' "
                            f"has a puzzle id from the reference {reference}, so they answer "
                            "other puzzles. Pass the test split these predictions were made on.")
        reports.append(report(j, resamples, seed, cello1_compat, unit, ref, table))
        reports[-1].missing_shards = list(run.missing_shards)
        reports[-1].limited = _shortfall(run, int(reports[-1].overall["count"]))
    return ScoreResult(reports, unit)


def _shortfall(run: RunInput, answered: int) -> dict[str, Any] | None:
    """A run that answers fewer puzzles than its test set holds (predict --limit); a run with
    missing shards says so itself (`missing_shards`) unless a limit also cut it short."""
    if run.set_size is None or answered >= run.set_size:
        return None
    if run.missing_shards and run.limit is None:
        return None
    return {"answered": answered, "of": run.set_size, "limit": run.limit}

