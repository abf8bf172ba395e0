"""`cellpuzzle merge-lora`: merge a LoRA adapter into its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import (
    OutputDir,
    Overwrite,
    TrustRemoteCode,
    console,
    input_or_latest,
    manifest,
    progress_bar,
    quiet_libraries,
    record,
    start,
)
from cellpuzzle_cli.manifest import Artifact


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

    The output of `sft finetune=full` is already a whole model: it is copied unchanged.

    Running it again on unchanged inputs does nothing ("up to date").

    Example: cellpuzzle merge-lora adapter -o sft-model
    """
    from cellpuzzle_cli.lora import copy_full_model, merge_adapter, plan_merge

    started = start()
    adapter = input_or_latest(ctx, adapter, "sft", "adapter", name="adapter")
    plan = plan_merge(manifest(ctx), adapter, base, output, overwrite)
    if plan.up_to_date:
        console.print(f"[bold]{output} is up to date[/bold]: merged from the same adapter "
                      "and base model, unchanged since. Nothing to do.")
        return
    quiet_libraries()
    with progress_bar("merge-lora") as update:
        if plan.full_model:
            result = copy_full_model(adapter, output, overwrite=overwrite, progress=update)
        else:
            result = merge_adapter(adapter, output, plan.base, overwrite=overwrite,
                                   trust_remote_code=trust_remote_code, progress=update)
    if plan.full_model:
        console.print(f"[bold green]{adapter} is a full fine-tune (sft finetune=full): nothing "
                      f"to merge, copied to {result.out}[/bold green]: {result.parameters:,} "
                      f"parameters ({result.dtype})")
    else:
        console.print(f"[bold green]Merged model written to {result.out}[/bold green]: "
                      f"{result.parameters:,} parameters ({result.dtype}), base {result.base}")
    record(ctx, "merge-lora", {"adapter": adapter, "base": plan.base, "overwrite": overwrite},
           started, plan.inputs, [Artifact(output, "model")])
