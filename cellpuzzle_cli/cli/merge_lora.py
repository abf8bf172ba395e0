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

    Running it again on unchanged inputs does nothing ("up to date").

    Example: cellpuzzle merge-lora adapter -o sft-model
    """
    from cellpuzzle_cli.cli.sft import quiet_libraries
    from cellpuzzle_cli.lora import (
        check_adapter,
        merge_adapter,
        recorded_base,
        resolve_base,
        up_to_date,
    )
    from cellpuzzle_cli.manifest import describe

    started = start()
    ledger = manifest(ctx)
    adapter = input_or_latest(ctx, adapter, "sft", "adapter", name="adapter")
    check_adapter(adapter)
    base_model = resolve_base(adapter, base, recorded_base(ledger, adapter))
    inputs = [Artifact(adapter, "adapter")]
    if Path(base_model).exists():
        inputs.append(Artifact(Path(base_model), "base_model"))
    if output.exists() and not overwrite:
        now = {a.name: describe(a.path) for a in inputs}
        if up_to_date(ledger.entries(), ledger.relative, now, output, describe(output)):
            console.print(f"[bold]{output} is up to date[/bold]: merged from the same adapter "
                          "and base model, unchanged since. Nothing to do.")
            return
    quiet_libraries()
    with progress_bar("merge-lora") as update:
        result = merge_adapter(adapter, output, base_model, overwrite=overwrite,
                               trust_remote_code=trust_remote_code, progress=update)
    console.print(f"[bold green]Merged model written to {result.out}[/bold green]: "
                  f"{result.parameters:,} parameters ({result.dtype}), base {result.base}")
    record(ctx, "merge-lora", {"adapter": adapter, "base": base_model, "overwrite": overwrite},
           started, inputs, [Artifact(output, "model")])
