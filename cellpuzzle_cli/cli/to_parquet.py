"""`cellpuzzle to-parquet`: training puzzles to verl's RL Parquet format."""

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
from cellpuzzle_cli.runner import Outcome, Request
from cellpuzzle_cli.to_parquet import ToParquetSettings, one_input


def to_parquet(
    ctx: typer.Context,
    train: Annotated[Path | None, typer.Argument(
        help="Training puzzles (train.jsonl from `split`, or CellPuzzles JSON/Parquet). Default: "
             "the latest split's train file in the manifest.", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", "-d", help="The training puzzles, as an option (like sft and predict take "
                             "them); same as the positional argument.", show_default=False)]
    = None,
    output: OutputDir = Path("rl-data"),
    val_size: Annotated[float, typer.Option(
        "--val-size", help="Validation puzzles: a fraction (<1) or a count; whole donor groups "
                           "when there are three or more.")] = ToParquetSettings.val_size,
    data_source: Annotated[str, typer.Option(
        "--data-source", help="The rows' data_source. Our reward accepts any; Cell-o1's reward "
                              "returns -1 unless it contains 'cell_data', so pass cell_data to "
                              "train with that reward.")] = ToParquetSettings.data_source,
    seed: Seed = ToParquetSettings.seed,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    overrides: Overrides = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """Training puzzles to verl's RL Parquet schema: train.parquet and val.parquet.

    Prompts are the same system + user turns that sft trains on and predict asks with.

    Example: cellpuzzle to-parquet splits/train.jsonl -o rl-data --val-size 0.1
    """
    train, overrides = one_path(train, overrides, "training files")
    options = given(ctx, val_size=val_size, seed=seed, data_source=data_source)
    execute(ctx, Request("to-parquet", {"train": one_input(train, data)}, output, options,
                         overrides, config, overwrite), fmt, _print_result)


def _print_result(outcome: Outcome) -> None:
    result = outcome.result
    groups = (f" (whole groups held out: {', '.join(result.val_groups)})" if result.val_groups
              else " (random puzzles held out)" if result.n_val else "")
    console.print(f"[bold green]RL data written to {result.out}[/bold green]: "
                  f"{result.n_train} train, {result.n_val} val puzzles{groups}")
