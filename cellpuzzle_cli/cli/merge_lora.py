"""`cellpuzzle merge-lora`: merge a LoRA adapter into its base model."""

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
    TrustRemoteCode,
    console,
    execute,
    given,
    one_path,
)
from cellpuzzle_cli.runner import Outcome, Request


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
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Dtype of the merged model: auto (the base model's), bfloat16, float16 "
                        "or float32.")] = "auto",
    config: ConfigFile = None,
    overrides: Overrides = None,
    fmt: Format = OutputFormat.human,
) -> None:
    """Merge a LoRA adapter into its base model: one plain Hugging Face model folder.

    The output of `sft finetune=full` is already a whole model: it is copied unchanged.

    Running it again on unchanged inputs does nothing ("up to date").

    Example: cellpuzzle merge-lora adapter -o sft-model
    """
    adapter, overrides = one_path(adapter, overrides, "adapters")
    options = given(ctx, dtype=dtype)
    flags = {"base": base, "trust_remote_code": trust_remote_code}
    execute(ctx, Request("merge-lora", {"adapter": adapter}, output, options, overrides, config,
                         overwrite, flags), fmt, _print_result)


def _print_result(outcome: Outcome) -> None:
    result = outcome.result
    if result.copied:
        console.print(f"[bold green]{result.adapter} is a full fine-tune (sft finetune=full): "
                      f"nothing to merge, copied to {result.out}[/bold green]: "
                      f"{result.parameters:,} parameters ({result.dtype})")
    else:
        console.print(f"[bold green]Merged model written to {result.out}[/bold green]: "
                      f"{result.parameters:,} parameters ({result.dtype}), base {result.base}")
