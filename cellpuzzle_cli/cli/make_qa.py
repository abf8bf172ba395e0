"""`cellpuzzle make-qa`: Cells to CellPuzzles: N cells, N candidate types, one donor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    Format,
    OutputDir,
    OutputFormat,
    Overrides,
    Overwrite,
    Seed,
    console,
    execute,
    given,
    one_path,
)
from cellpuzzle_cli.make_qa import MakeQaSettings
from cellpuzzle_cli.runner import Request


def make_qa(
    ctx: typer.Context,
    output: OutputDir,
    cells: Annotated[Path | None, typer.Argument(
        help="Cell tables from build-context: a folder (searched recursively) or one .parquet "
             "file. Default: the latest build-context output in the manifest.",
        show_default=False)] = None,
    min_n: Annotated[int, typer.Option("--min-n", help="Smallest puzzle (cells per puzzle).")]
    = MakeQaSettings.min_n,
    max_n: Annotated[int, typer.Option("--max-n", help="Largest puzzle; capped per group by "
                                                       "its number of cell types.")]
    = MakeQaSettings.max_n,
    per_n: Annotated[int, typer.Option("--per-n", help="Puzzles per N per donor group (fewer "
                                                       "when a group runs out of distinct "
                                                       "cell sets).")] = MakeQaSettings.per_n,
    seed: Seed = MakeQaSettings.seed,
    sort_candidates: Annotated[bool, typer.Option(
        "--sort-candidates", help="List candidates alphabetically (Cell-o1's layout) instead "
                                  "of shuffled.")] = MakeQaSettings.sort_candidates,
    ignore_batch: Annotated[bool, typer.Option(
        "--ignore-batch", help="Group by (dataset, donor) only, even where batch_id is set.")]
    = MakeQaSettings.ignore_batch,
    test_cells: Annotated[float, typer.Option(
        "--test-cells", help="For single-donor data: reserve this fraction of each type's cells "
                             "for test puzzles (tagged cell_fold), so `split --group-by cell` "
                             "loses no puzzle to leakage. 0: off.")] = MakeQaSettings.test_cells,
    extra_candidates: Annotated[int, typer.Option(
        "--extra-candidates", help="Open-set puzzles: add up to K cell types absent from the "
                                   "puzzle's cells to its candidates (from the donor group's "
                                   "other types first, then the dataset's). 0: closed puzzles.")]
    = MakeQaSettings.extra_candidates,
    config: ConfigFile = None,
    overrides: Overrides = None,
    overwrite: Overwrite = False,
    fmt: Format = OutputFormat.human,
) -> None:
    """Cells to CellPuzzles: N cells, N candidate types, one donor.

    Writes [bold]puzzles.jsonl[/bold] (puzzle_id, dataset, group, donor_id, n, cell_ids,
    question, answer, candidates) and make-qa.yaml (the settings, reloadable with --config)
    into the output folder.

    Example: [bold]cellpuzzle make-qa cells/ -o puzzles/ --min-n 3 --max-n 15 --per-n 20[/bold]
    """
    cells, settings = one_path(cells, overrides, "cells folders")
    options = given(ctx, min_n=min_n, max_n=max_n, per_n=per_n, seed=seed,
                    sort_candidates=sort_candidates, ignore_batch=ignore_batch,
                    test_cells=test_cells, extra_candidates=extra_candidates)
    execute(ctx, Request("make-qa", {"cells": cells}, output, options, settings, config,
                         overwrite), fmt, lambda outcome: _print_summary(outcome.result))


def _print_summary(result) -> None:
    from rich.table import Table

    table = Table(title=f"make-qa: {result.n_puzzles} puzzles from {result.n_cells} cells "
                        f"({result.n_files} file(s)) → {result.puzzles_path}")
    for col in ("N", "puzzles", "groups", "short of quota"):
        table.add_column(col, justify="right")
    for n, count in result.puzzles_per_n.items():
        table.add_row(str(n), str(count), str(result.groups_per_n.get(n, 0)),
                      str(result.short_per_n.get(n, 0)))
    console.print(table)
    console.print(f"Groups used: {result.groups_used}; skipped (fewer than --min-n cell types): "
                  f"{result.groups_skipped}"
                  + (f", e.g. {', '.join(result.skipped_examples)}" if result.skipped_examples
                     else ""))
    if set(result.per_fold) != {"all"}:
        console.print("Puzzles per cell fold: " + ", ".join(f"{k} {v}" for k, v in
                                                            result.per_fold.items()))
    if result.mixed_context:
        console.print(f"[yellow]{result.mixed_context} puzzle(s) mix cells with different "
                      "context paragraphs; the most common one was used.[/yellow]")
