"""score as a pipeline step: which runs, every metric family, what to record.

The runs are found (given files and folders, or every shard of the latest predict run), scored,
written as --json, --plot (with the confusion heatmap beside it) and --html (one self-contained
page with the tables and plots), and described for the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import spare_inputs
from cellpuzzle_cli.manifest import Artifact, Kind, RunRecord
from cellpuzzle_cli.score.plot import plot_by_n, render_plots
from cellpuzzle_cli.score.report import ScoreResult, score_runs
from cellpuzzle_cli.score.runs import RunInput, collect_files, with_predict_facts
from cellpuzzle_cli.score.settings import ScoreSettings

if TYPE_CHECKING:
    from cellpuzzle_cli.io import Progress
    from cellpuzzle_cli.runner import Job


@dataclass
class ScoreOutcome:
    result: ScoreResult
    notes: list[str]
    warnings: list[str]
    records: list[RunRecord]

    def summary(self) -> dict[str, Any]:
        return self.records[0].extra["summary"]


def _runs_from_manifest(ledger: Any, partial: bool) -> tuple[list[RunInput], list[str], list[str]]:
    """Every shard of the latest predict run; an incomplete set only with `partial`."""
    from cellpuzzle_cli.predict.shards import latest_run_shards, shard_filename

    shards = latest_run_shards(ledger)
    warnings = []
    if shards.missing:
        listed = ", ".join(str(i) for i in shards.missing)
        if not partial or not shards.files:
            raise UserError(
                f"The latest `predict` run ({shards.output_dir}, {shards.num_shards} shard(s)) is "
                f"incomplete: shard(s) {listed} of {shards.num_shards} have no finished entry in "
                f"{ledger.path}. Run them (`cellpuzzle predict --shard i/{shards.num_shards} …`), "
                "or pass --partial to score the finished shards only.")
        warnings.append(f"Scoring {len(shards.files)} of {shards.num_shards} shards; missing: "
                        f"{listed}.")
    notes = [f"Using predictions from the manifest: {shards.output_dir}"]
    run = RunInput(Path(shards.output_dir).name or "predictions", shards.files, strict=True,
                   missing_shards=[shard_filename(i, shards.num_shards) for i in shards.missing])
    if shards.files:
        with_predict_facts(run, shards.files[0].parent)
    return [run], notes, warnings


def _limited(report: Any) -> str | None:
    """A run that answers only part of its test set (predict --limit), said plainly."""
    part = report.limited
    if not part or report.missing_shards:   # missing shards have their own warning
        return None
    how = f" (predict --limit {part['limit']})" if part.get("limit") else ""
    return (f"Run '{report.name}' is partial: it answers {part['answered']} of the "
            f"{part['of']} puzzles of its test set{how}; its scores cover those only. Run "
            "predict again without --limit into the same folder to answer the rest.")


def _unreadable(report: Any, run: RunInput) -> str | None:
    """A warning when most of a run's answers could not be read, with the first such answer."""
    from cellpuzzle_cli.answer import parse_answer, unreadable_warning
    from cellpuzzle_cli.score.runs import file_records

    count, errors = int(report.overall["count"]), int(report.errors)   # errors: no answer at all
    total = count - errors
    bad = total - round(report.overall["format_legitimacy"] * count)
    if bad * 2 <= total:
        return None
    example = next((r.get("prediction") for f in run.files for r in file_records(f)
                    if r.get("prediction") is not None
                    and not parse_answer(r.get("prediction")).legitimate), None)
    return unreadable_warning(f"Run '{report.name}'", total, bad, example)


def step(job: Job, progress: Progress | None = None) -> ScoreOutcome:
    """Score the given runs (or the latest predict run), write --json/--plot, say what to record."""
    settings: ScoreSettings = job.settings
    given = list(job.inputs.get("predictions") or [])
    if given:
        runs, notes = collect_files(given, settings.partial), []
        warnings = [f"Run '{r.name}' is partial: {', '.join(r.missing_shards)} missing; its "
                    "scores cover the finished shards only." for r in runs if r.missing_shards]
        input_paths = given
    else:
        runs, notes, warnings = _runs_from_manifest(job.ledger, settings.partial)
        input_paths = runs[0].files
    reference, label_ids = job.inputs.get("reference"), job.inputs.get("label ids")
    json_out, plot, tokenizer = job.flag("json"), job.flag("plot"), job.flag("tokenizer")
    html = job.flag("html")
    spare_inputs([("--json", json_out), ("--plot", plot), ("--html", html)],
                 [*(f for r in runs for f in r.files), *filter(None, (reference, label_ids))])
    result = score_runs(runs, cello1_compat=settings.cello1_compat, tokenizer=tokenizer,
                        reference=reference, resamples=settings.bootstrap, seed=settings.seed,
                        label_ids=label_ids)
    warnings += [w for r in result.reports if (w := _limited(r))]
    warnings += [w for r, run in zip(result.reports, runs) if (w := _unreadable(r, run))]
    outputs = []
    if json_out is not None:
        from cellpuzzle_cli.io import write_json

        write_json(json_out, result.to_json())
        outputs.append(Artifact(json_out, "report", Kind.REPORT))
    plots = render_plots(result.reports) if plot is not None or html is not None else {}
    if plot is not None:
        outputs += [Artifact(path, "plot", Kind.PLOT)
                    for path in plot_by_n(result.reports, plot, plots)]
    if html is not None:
        from cellpuzzle_cli.score.html import write_html

        outputs.append(Artifact(write_html(html, result, plots, warnings), "html", Kind.REPORT))
    params = {"runs": [r.name for r in runs], "cello1_compat": settings.cello1_compat,
              "tokenizer": tokenizer, "reference": reference, "partial": settings.partial,
              "bootstrap": settings.bootstrap, "seed": settings.seed, "json": json_out,
              "plot": plot, "html": html, "label_ids": label_ids,
              "prediction_length_unit": result.length_unit}
    summary = {r.name: {k: r.overall[k] for k in ("count", "cell_accuracy", "exact_match",
                                                  "format_legitimacy", "uniqueness", "errors")}
               for r in result.reports}
    inputs = [Artifact(Path(p), "predictions") for p in input_paths]
    if reference is not None:
        inputs.append(Artifact(reference, "reference"))
    if label_ids is not None:
        inputs.append(Artifact(label_ids, "label ids"))
    # recorded even without --json/--plot, so the manifest says the run was scored
    record = RunRecord(params, inputs, outputs, {"summary": summary})
    return ScoreOutcome(result, notes, warnings, [record])
