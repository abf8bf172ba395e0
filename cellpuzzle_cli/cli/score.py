"""`cellpuzzle score`: Cell-o1 metrics for prediction files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    Format,
    OutputFormat,
    Seed,
    console,
    execute,
    given,
    output_file,
    split_args,
)
from cellpuzzle_cli.runner import Outcome, Request
from cellpuzzle_cli.score.settings import ScoreSettings

_METRIC_LABELS = (("cell_accuracy", "Cell accuracy"), ("exact_match", "Exact match"),
                  ("format_legitimacy", "Format legitimacy"), ("uniqueness", "Uniqueness"))


def score(
    ctx: typer.Context,
    predictions: Annotated[list[str] | None, typer.Argument(
        help="Prediction JSONL files, or folders of them (one folder = one run; several folders "
             "= one column each), and key=value settings. Default: every shard of the latest "
             "`predict` run in the manifest.",
        show_default=False)] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="Write a PNG of accuracy by N here.")] = None,
    html: Annotated[str | None, typer.Option(
        "--html", help="Write a one-page HTML report here: the tables (with chance, per type), "
                       "and the plots embedded, so the one file opens in any browser.",
        show_default=False)] = None,
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Test split; report puzzles that have no prediction.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", help="Tokenizer folder for prediction_length in tokens (default: whitespace words).")] = None,
    cello1_compat: Annotated[bool, typer.Option(
        "--cello1-compat", help="Reproduce Cell-o1's script: extra items still count as exact; "
                                "case-sensitive uniqueness.")] = False,
    partial: Annotated[bool, typer.Option(
        "--partial", help="Score an incomplete predict run (shards missing) on its finished "
                          "shards; the report marks the run partial.")] = False,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none).")] = ScoreSettings.bootstrap,
    label_ids: Annotated[Path | None, typer.Option(
        "--label-ids", help="TSV of `label<TAB>CL term ID` for hierarchical metrics on data "
                            "without ontology IDs.")] = None,
    seed: Seed = ScoreSettings.seed,
    config: ConfigFile = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """Cell-o1 metrics (cell accuracy, exact match, format legitimacy, uniqueness, length) for predictions.

    Example: [bold]cellpuzzle score preds/ --json report.json --plot by_n.png[/bold]
    One page to share: [bold]cellpuzzle score preds-a/ preds-b/ --html report.html[/bold]
    Compare runs: [bold]cellpuzzle score runs/sft/ runs/grpo/ --reference splits/test.jsonl[/bold]
    """
    files, overrides = split_args(predictions)
    options = given(ctx, cello1_compat=cello1_compat, partial=partial, bootstrap=bootstrap,
                    seed=seed)
    inputs = {"predictions": files, "reference": reference, "label ids": label_ids}
    flags = {"json": output_file(json_out, "--json"), "plot": output_file(plot, "--plot"),
             "html": output_file(html, "--html"), "tokenizer": tokenizer}
    execute(ctx, Request("score", inputs, None, options, overrides, config, False, flags), fmt,
            _print)


def _cell(metrics: dict[str, Any], key: str) -> str:
    text = f"{metrics[key]:.4f} ± {metrics[f'{key}_pm']:.4f}"
    ci = metrics.get(f"{key}_ci95")
    if ci:
        text += f" [dim][{ci[0]:.3f}, {ci[1]:.3f}][/dim]"
    return text


def _print(outcome: Outcome) -> None:
    from rich.table import Table

    from cellpuzzle_cli.cli.score_tables import chance_cell, print_family_tables, print_gap_table

    result = outcome.result.result
    reports = result.reports
    table = Table(title=f"Scores (± as Cell-o1 reports it; [95% bootstrap CI]; prediction length in "
                        f"{result.length_unit})", title_justify="left")
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name, justify="right")
    for key, label in _METRIC_LABELS:
        table.add_row(label, *[_cell(r.overall, key) for r in reports])
    table.add_row("Prediction length", *[f"{r.overall['prediction_length']:.1f}" for r in reports])
    table.add_row("Predictions", *[str(r.overall["count"]) + (
        f" of {r.limited['of']} (partial)" if r.limited else "") for r in reports])
    table.add_row("Failed (error)", *[str(r.errors) for r in reports])
    if any(r.missing is not None for r in reports):
        table.add_row("Missing vs reference",
                      *[str(len(r.missing)) if r.missing is not None else "-" for r in reports])
    console.print(table)

    by_n = Table(title="By N: cell accuracy / exact match (count)", title_justify="left")
    by_n.add_column("N", justify="right")
    for r in reports:
        by_n.add_column(r.name, justify="right")
    by_n.add_column("chance", justify="right", style="dim")
    for n in sorted({k for r in reports for k in r.by_n}):
        row = []
        for r in reports:
            m = r.by_n.get(n)
            row.append(f"{m['cell_accuracy']:.3f} / {m['exact_match']:.3f} ({m['count']})" if m else "-")
        by_n.add_row(str(n), *row, chance_cell(next((r.by_n[n] for r in reports
                                                     if n in r.by_n), None)))
    console.print(by_n)
    print_gap_table(console, reports)
    print_family_tables(console, reports)
    for r in reports:
        if r.missing:
            shown = ", ".join(r.missing[:10]) + (" …" if len(r.missing) > 10 else "")
            console.print(f"[yellow]{r.name}: {len(r.missing)} puzzle(s) of the reference have no "
                          f"prediction: {shown}[/yellow]")
