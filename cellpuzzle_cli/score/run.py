"""The service behind `cellpuzzle score`: which runs, every metric family, what to record.

The command module only parses options into a `ScoreRequest`; here the runs are found (given
files and folders, or every shard of the latest predict run), scored, written as --json and
--plot (with the confusion heatmap beside it), and described for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.score.plot import plot_by_n
from cellpuzzle_cli.score.report import ScoreResult, score_runs
from cellpuzzle_cli.score.runs import RunInput, collect_files


@dataclass
class ScoreRequest:
    """What `cellpuzzle score` was asked; no `predictions` means the latest predict run."""

    predictions: list[Path] = field(default_factory=list)
    json_out: Path | None = None
    plot: Path | None = None
    reference: Path | None = None
    tokenizer: Path | None = None
    cello1_compat: bool = False
    partial: bool = False
    bootstrap: int = 1000
    seed: int = 0
    label_ids: Path | None = None   # label -> CL term table for data without ontology IDs


@dataclass
class ScoreOutcome:
    result: ScoreResult
    notes: list[str]
    warnings: list[str]
    record: Any  # manifest.RunRecord


def _runs_from_manifest(manifest: Any, partial: bool) -> tuple[list[RunInput], list[str], list[str]]:
    """Every shard of the latest predict run; an incomplete set only with `partial`."""
    shards = manifest.predict_shards()
    warnings = []
    if shards.missing:
        listed = ", ".join(str(i) for i in shards.missing)
        if not partial or not shards.files:
            raise UserError(
                f"The latest `predict` run ({shards.output_dir}, {shards.num_shards} shard(s)) is "
                f"incomplete: shard(s) {listed} of {shards.num_shards} have no finished entry in "
                f"{manifest.path}. Run them (`cellpuzzle predict --shard i/{shards.num_shards} …`), "
                "or pass --partial to score the finished shards only.")
        warnings.append(f"Scoring {len(shards.files)} of {shards.num_shards} shards; missing: "
                        f"{listed}.")
    notes = [f"Using predictions from the manifest: {shards.output_dir}"]
    run = RunInput(Path(shards.output_dir).name or "predictions", shards.files, strict=True)
    return [run], notes, warnings


def score(req: ScoreRequest, manifest: Any) -> ScoreOutcome:
    """Score the given runs (or the latest predict run), write --json/--plot, say what to record."""
    from cellpuzzle_cli.manifest import Artifact, RunRecord

    if req.predictions:
        runs, notes, warnings = collect_files(req.predictions), [], []
        input_paths = list(req.predictions)
    else:
        runs, notes, warnings = _runs_from_manifest(manifest, req.partial)
        input_paths = runs[0].files
    result = score_runs(runs, cello1_compat=req.cello1_compat, tokenizer=req.tokenizer,
                        reference=req.reference, resamples=req.bootstrap, seed=req.seed,
                        label_ids=req.label_ids)
    outputs = []
    if req.json_out is not None:
        from cellpuzzle_cli.io import write_json

        write_json(req.json_out, result.to_json())
        outputs.append(Artifact(req.json_out, "report"))
    if req.plot is not None:
        outputs += [Artifact(path, "plot") for path in plot_by_n(result.reports, req.plot)]
    params = {"runs": [r.name for r in runs], "cello1_compat": req.cello1_compat,
              "tokenizer": req.tokenizer, "reference": req.reference, "partial": req.partial,
              "bootstrap": req.bootstrap, "seed": req.seed, "json": req.json_out,
              "plot": req.plot, "label_ids": req.label_ids,
              "prediction_length_unit": result.length_unit}
    summary = {r.name: {k: r.overall[k] for k in ("count", "cell_accuracy", "exact_match",
                                                  "format_legitimacy", "uniqueness", "errors")}
               for r in result.reports}
    inputs = [Artifact(p, "predictions") for p in input_paths]
    if req.reference is not None:
        inputs.append(Artifact(req.reference, "reference"))
    if req.label_ids is not None:
        inputs.append(Artifact(req.label_ids, "label ids"))
    return ScoreOutcome(result, notes, warnings,
                        RunRecord(params, inputs, outputs, {"summary": summary}))
