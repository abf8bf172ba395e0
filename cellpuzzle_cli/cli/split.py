"""`cellpuzzle split`: Leakage-free, N-stratified train/test split of puzzles."""

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
from cellpuzzle_cli.runner import Request
from cellpuzzle_cli.split import SplitSettings


def split(
    ctx: typer.Context,
    output: OutputDir,
    puzzles: Annotated[Path | None, typer.Argument(
        help="make-qa's output folder or a puzzles .jsonl. Default: the latest make-qa output "
             "in the manifest.", show_default=False)] = None,
    group_by: Annotated[str, typer.Option(
        "--group-by", help="What never straddles train and test: donor, dataset, or cell "
                           "(for single-donor data).")] = SplitSettings.group_by,
    test_fraction: Annotated[float, typer.Option(
        "--test-fraction", help="Share of puzzles aimed for in test (before --max-test); "
                                "unused when make-qa --test-cells already chose the cells.")]
    = SplitSettings.test_fraction,
    max_test: Annotated[int, typer.Option("--max-test", help="At most this many test puzzles.")]
    = SplitSettings.max_test,
    seed: Seed = SplitSettings.seed,
    system_prompt_file: Annotated[Path | None, typer.Option(
        "--system-prompt-file", help="Text file to use as system_msg instead of the shipped "
                                     "instructions.", show_default=False)] = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    overrides: Overrides = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """Leakage-free, N-stratified train/test split of puzzles.

    Writes [bold]train.jsonl[/bold] and [bold]test.jsonl[/bold] (system_msg, user_msg,
    assistant_msg, puzzle_id, n, group, dataset, donor_id, cell_ids) and split.yaml (the
    settings, reloadable with --config).

    Single-donor data: make the puzzles with [bold]make-qa --test-cells 0.2[/bold] and split
    with [bold]--group-by cell[/bold]; train and test then share no cell and lose no puzzle.

    Example: [bold]cellpuzzle split puzzles/ -o splits/ --group-by donor --max-test 1100[/bold]
    """
    puzzles, overrides = one_path(puzzles, overrides, "puzzle files")
    options = given(ctx, group_by=group_by, test_fraction=test_fraction, max_test=max_test,
                    seed=seed, system_prompt_file=system_prompt_file)
    execute(ctx, Request("split", {"puzzles": puzzles}, output, options, overrides, config,
                         overwrite), fmt, lambda outcome: _print_summary(outcome.result))


def _print_summary(result) -> None:
    from rich.table import Table

    table = Table(title=f"split (--group-by {result.group_by}: {result.method}) → "
                        f"{result.out_dir}")
    columns = ("train", "test", "dropped_leak", "dropped_cap")
    headers = ("train", "test", "dropped: shares a cell", "dropped: over --max-test")
    table.add_column("N", justify="right")
    for h in headers:
        table.add_column(h, justify="right")
    for n, row in result.per_n.items():
        table.add_row(str(n), *(str(row[c]) for c in columns))
    table.add_row("all", *(str(result.total(c)) for c in columns), style="bold")
    console.print(table)
    counts = result.counts
    for what in ("donors", "cells"):
        note = (" (expected: --group-by cell splits one donor's cells)"
                if what == "donors" and result.group_by == "cell" and counts["shared"][what]
                else "")
        console.print(f"{what.capitalize()}: train {counts['train'][what]}, test "
                      f"{counts['test'][what]}, shared {counts['shared'][what]}{note}")
