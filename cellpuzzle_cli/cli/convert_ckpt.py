"""`cellpuzzle convert-ckpt`: verl FSDP checkpoint shards to a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    OutputDir,
    Overwrite,
    console,
    input_or_latest,
    progress_bar,
    record,
    start,
)
from cellpuzzle_cli.manifest import Artifact, Kind


def convert_ckpt(
    ctx: typer.Context,
    checkpoint: Annotated[Path | None, typer.Argument(
        help="verl checkpoint: the root (trainer.default_local_dir, latest step is used), a "
             "global_step_N folder, or its actor folder. Default: the latest `rl` output.",
        show_default=False)] = None,
    output: OutputDir = Path("hf-model"),
    dtype: Annotated[str, typer.Option(
        "--dtype", help="keep (default: the dtype the shards hold), bf16, fp16 or fp32. verl's own "
                        "merger always casts to bf16.")] = "keep",
    overwrite: Overwrite = False,
) -> None:
    """verl FSDP checkpoint shards (any world size) to a Hugging Face safetensors folder.

    Example: [bold]cellpuzzle convert-ckpt checkpoints/ -o hf-model[/bold]
    """
    from cellpuzzle_cli.checkpoint import convert_checkpoint

    started = start(ctx)
    ckpt = input_or_latest(ctx, checkpoint, Kind.CHECKPOINTS, "checkpoint")
    with progress_bar("convert-ckpt") as update:
        result = convert_checkpoint(ckpt, output, dtype=dtype, overwrite=overwrite, progress=update)
    console.print(f"[green]Converted[/green] {result.actor_dir} ({result.world_size} rank(s)) -> "
                  f"{result.output}: {result.n_tensors} tensors, {result.n_parameters:,} parameters, "
                  f"dtype {', '.join(result.dtypes)}"
                  + (f"; tied copies dropped: {', '.join(result.dropped_tied)}"
                     if result.dropped_tied else ""))
    record(ctx, "convert-ckpt", {"checkpoint": ckpt, "output": output, "dtype": dtype}, started,
           [Artifact(result.actor_dir, "checkpoint")], [Artifact(result.output, "model")])
