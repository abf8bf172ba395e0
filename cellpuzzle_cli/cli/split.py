"""`cellpuzzle split`: Leakage-free, N-stratified train/test split of puzzles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    OutputDir,
    Overwrite,
    Seed,
    console,
    err_console,
    input_or_latest,
    run_step,
    start,
    step_settings,
)
from cellpuzzle_cli.manifest import Artifact, Kind
from cellpuzzle_cli.splitting import TEST_FILE, TRAIN_FILE, SplitConfig


def split(
    ctx: typer.Context,
    output: OutputDir,
    puzzles: Annotated[Path | None, typer.Argument(
        help="make-qa's output folder or a puzzles .jsonl. Default: the latest make-qa output "
             "in the manifest.", show_default=False)] = None,
    group_by: Annotated[str, typer.Option(
        "--group-by", help="What never straddles train and test: donor, dataset, or cell "
                           "(for single-donor data).")] = SplitConfig.group_by,
    test_fraction: Annotated[float, typer.Option(
        "--test-fraction", help="Share of puzzles aimed for in test (before --max-test); "
                                "unused when make-qa --test-cells already chose the cells.")]
    = SplitConfig.test_fraction,
    max_test: Annotated[int, typer.Option("--max-test", help="At most this many test puzzles.")]
    = SplitConfig.max_test,
    seed: Seed = SplitConfig.seed,
    system_prompt_file: Annotated[Path | None, typer.Option(
        "--system-prompt-file", help="Text file to use as system_msg instead of the shipped "
                                     "instructions.", show_default=False)] = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
) -> None:
    """Leakage-free, N-stratified train/test split of puzzles.

    Writes [bold]train.jsonl[/bold] and [bold]test.jsonl[/bold] (system_msg, user_msg,
    assistant_msg, puzzle_id, n, group, dataset, donor_id, cell_ids) and split.yaml (the
    settings, reloadable with --config).

    Single-donor data: make the puzzles with [bold]make-qa --test-cells 0.2[/bold] and split
    with [bold]--group-by cell[/bold]; train and test then share no cell and lose no puzzle.

    Example: [bold]cellpuzzle split puzzles/ -o splits/ --group-by donor --max-test 1100[/bold]
    """
    from cellpuzzle_cli.config import settings_dict
    from cellpuzzle_cli.splitting import split_puzzles

    started = start(ctx)
    settings = step_settings(ctx, SplitConfig, config, group_by=group_by,
                             test_fraction=test_fraction, max_test=max_test, seed=seed,
                             system_prompt_file=system_prompt_file)
    puzzles_path = input_or_latest(ctx, puzzles, Kind.PUZZLES, "puzzles")
    outputs = [Artifact(output / TRAIN_FILE, "train"), Artifact(output / TEST_FILE, "test")]
    result = run_step(
        ctx, started, "split", params={**settings_dict(settings), "puzzles": puzzles_path},
        inputs=[Artifact(puzzles_path, "puzzles")], outputs=outputs, folder=output,
        overwrite=overwrite, label="Splitting puzzles",
        work=lambda update: split_puzzles(puzzles_path, output, settings, overwrite=overwrite,
                                          progress=update))
    if result is not None:
        _print_summary(result)


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
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
