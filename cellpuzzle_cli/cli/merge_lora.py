"""`cellpuzzle merge-lora`: merge a LoRA adapter into its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    OutputDir,
    Overwrite,
    TrustRemoteCode,
    begin_step,
    console,
    input_or_latest,
    manifest,
    progress_bar,
    quiet_libraries,
    start,
)
from cellpuzzle_cli.manifest import Artifact, Kind


def merge_lora(
    ctx: typer.Context,
    adapter: Annotated[Path | None, typer.Argument(
        help="Adapter folder from `cellpuzzle sft`. Default: the latest one in the manifest.",
        show_default=False)] = None,
    output: OutputDir = Path("sft-model"),
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model folder. Default: the one named in the adapter's "
                       "adapter_config.json, else the one the manifest recorded for its sft run.")]
    = None,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Merge a LoRA adapter into its base model: one plain Hugging Face model folder.

    Running it again on unchanged inputs does nothing ("up to date").

    Example: cellpuzzle merge-lora adapter -o sft-model
    """
    from cellpuzzle_cli.lora import merge_adapter, plan_merge

    started = start(ctx)
    adapter = input_or_latest(ctx, adapter, Kind.ADAPTER, "adapter")
    plan = plan_merge(manifest(ctx), adapter, base)
    step = begin_step(ctx, "merge-lora", {"adapter": adapter, "base": plan.base}, plan.inputs,
                      [Artifact(output, "model")], output, overwrite)
    if step is None:
        return
    quiet_libraries()
    with step.publishing(), progress_bar("merge-lora") as update:
        result = merge_adapter(adapter, output, plan.base, overwrite=overwrite,
                               trust_remote_code=trust_remote_code, progress=update)
    console.print(f"[bold green]Merged model written to {result.out}[/bold green]: "
                  f"{result.parameters:,} parameters ({result.dtype}), base {result.base}")
    step.record(started)
