"""`cellpuzzle to-parquet`: training puzzles to verl's RL Parquet format."""

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
    input_or_latest,
    run_step,
    start,
    step_settings,
)
from cellpuzzle_cli.manifest import Artifact, Kind
from cellpuzzle_cli.to_parquet import TRAIN_FILE, VAL_FILE, ToParquetSettings


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
) -> None:
    """Training puzzles to verl's RL Parquet schema: train.parquet and val.parquet.

    Prompts are the same system + user turns that sft trains on and predict asks with.

    Example: cellpuzzle to-parquet splits/train.jsonl -o rl-data --val-size 0.1
    """
    from cellpuzzle_cli.config import settings_dict
    from cellpuzzle_cli.to_parquet import one_input
    from cellpuzzle_cli.to_parquet import to_parquet as run

    started = start(ctx)
    settings = step_settings(ctx, ToParquetSettings, config, val_size=val_size, seed=seed,
                             data_source=data_source)
    data = input_or_latest(ctx, one_input(train, data), Kind.TRAIN_PUZZLES, "training data")
    outputs = [Artifact(output / TRAIN_FILE, "train"), Artifact(output / VAL_FILE, "val")]
    result = run_step(
        ctx, started, "to-parquet", params={**settings_dict(settings), "data": data},
        inputs=[Artifact(data, "train")], outputs=outputs, folder=output, overwrite=overwrite,
        label="to-parquet", work=lambda _: run(data, output, settings, overwrite=overwrite))
    if result is None:
        return
    groups = (f" (whole groups held out: {', '.join(result.val_groups)})" if result.val_groups
              else " (random puzzles held out)" if result.n_val else "")
    console.print(f"[bold green]RL data written to {result.out}[/bold green]: "
                  f"{result.n_train} train, {result.n_val} val puzzles{groups}")
