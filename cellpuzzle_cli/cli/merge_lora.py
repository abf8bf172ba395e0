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
    quiet_libraries,
    run_step,
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

    The output of `sft finetune=full` is already a whole model: it is copied unchanged.

    Running it again on unchanged inputs does nothing ("up to date").

    Example: cellpuzzle merge-lora adapter -o sft-model
    """
    from cellpuzzle_cli.merge_lora import copy_full_model, merge_adapter, plan_merge

    started = start(ctx)
    adapter = input_or_latest(ctx, adapter, Kind.ADAPTER, "adapter")
    plan = plan_merge(manifest(ctx), adapter, base)
    quiet_libraries()
    if plan.full_model:
        def work(update):
            return copy_full_model(adapter, output, overwrite=overwrite, progress=update)
    else:
        def work(update):
            return merge_adapter(adapter, output, plan.base, overwrite=overwrite,
                                 trust_remote_code=trust_remote_code, progress=update)
    result = run_step(ctx, started, "merge-lora", params={"adapter": adapter, "base": plan.base},
                      inputs=plan.inputs, outputs=[Artifact(output, "model")], folder=output,
                      overwrite=overwrite, label="merge-lora", work=work)
    if result is None:
        return
    if plan.full_model:
        console.print(f"[bold green]{adapter} is a full fine-tune (sft finetune=full): nothing "
                      f"to merge, copied to {result.out}[/bold green]: {result.parameters:,} "
                      f"parameters ({result.dtype})")
    else:
        console.print(f"[bold green]Merged model written to {result.out}[/bold green]: "
                      f"{result.parameters:,} parameters ({result.dtype}), base {result.base}")
