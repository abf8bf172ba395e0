"""`cellpuzzle convert-ckpt`: verl FSDP checkpoint shards to a Hugging Face folder."""

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
    console,
    execute,
    given,
    one_path,
)
from cellpuzzle_cli.convert_ckpt import ConvertCkptSettings
from cellpuzzle_cli.runner import Outcome, Request


def convert_ckpt(
    ctx: typer.Context,
    checkpoint: Annotated[Path | None, typer.Argument(
        help="verl checkpoint: the root (trainer.default_local_dir, latest step is used), a "
             "global_step_N folder, or its actor folder. Default: the latest `rl` output.",
        show_default=False)] = None,
    output: OutputDir = Path("hf-model"),
    dtype: Annotated[str, typer.Option(
        "--dtype", help="auto (keep the dtype the shards hold), bfloat16, float16 or float32 "
                        "(bf16/fp16/fp32/keep also read). verl's own merger always casts to "
                        "bf16.")] = ConvertCkptSettings.dtype,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    overrides: Overrides = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """verl FSDP checkpoint shards (any world size) to a Hugging Face safetensors folder.

    Example: [bold]cellpuzzle convert-ckpt checkpoints/ -o hf-model[/bold]
    """
    checkpoint, overrides = one_path(checkpoint, overrides, "checkpoints")
    options = given(ctx, dtype=dtype)
    execute(ctx, Request("convert-ckpt", {"checkpoint": checkpoint}, output, options, overrides,
                         config, overwrite), fmt, _print_result)


def _print_result(outcome: Outcome) -> None:
    result = outcome.result
    console.print(f"[green]Converted[/green] {result.actor_dir} ({result.world_size} rank(s)) -> "
                  f"{result.output}: {result.n_tensors} tensors, {result.n_parameters:,} parameters, "
                  f"dtype {', '.join(result.dtypes)}"
                  + (f"; tied copies dropped: {', '.join(result.dropped_tied)}"
                     if result.dropped_tied else ""))
