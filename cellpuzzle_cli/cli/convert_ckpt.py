"""`cellpuzzle convert-ckpt`: verl FSDP checkpoint shards to a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    ConfigFile,
    OutputDir,
    Overwrite,
    console,
    input_or_latest,
    run_step,
    start,
    step_settings,
)
from cellpuzzle_cli.convert_ckpt import ConvertCkptSettings
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
                        "merger always casts to bf16.")] = ConvertCkptSettings.dtype,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
) -> None:
    """verl FSDP checkpoint shards (any world size) to a Hugging Face safetensors folder.

    Example: [bold]cellpuzzle convert-ckpt checkpoints/ -o hf-model[/bold]
    """
    from cellpuzzle_cli.convert_ckpt import convert_checkpoint, find_actor_dir

    started = start(ctx)
    settings = step_settings(ctx, ConvertCkptSettings, config, dtype=dtype)
    ckpt = input_or_latest(ctx, checkpoint, Kind.CHECKPOINTS, "checkpoint")
    actor = find_actor_dir(ckpt)
    result = run_step(
        ctx, started, "convert-ckpt", params={"checkpoint": ckpt, "dtype": settings.dtype},
        inputs=[Artifact(actor, "checkpoint")], outputs=[Artifact(output, "model")],
        folder=output, overwrite=overwrite, label="convert-ckpt",
        work=lambda update: convert_checkpoint(ckpt, output, dtype=settings.dtype,
                                               overwrite=overwrite, progress=update))
    if result is None:
        return
    console.print(f"[green]Converted[/green] {result.actor_dir} ({result.world_size} rank(s)) -> "
                  f"{result.output}: {result.n_tensors} tensors, {result.n_parameters:,} parameters, "
                  f"dtype {', '.join(result.dtypes)}"
                  + (f"; tied copies dropped: {', '.join(result.dropped_tied)}"
                     if result.dropped_tied else ""))
