"""`cellpuzzle merge-lora`: Merge a LoRA adapter into its base model."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def merge_lora(ctx: typer.Context) -> None:
    """Merge a LoRA adapter into its base model."""
    not_implemented("merge-lora")
