"""`cellpuzzle sft`: Supervised fine-tuning with TRL + PEFT LoRA."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def sft(ctx: typer.Context) -> None:
    """Supervised fine-tuning with TRL + PEFT LoRA."""
    not_implemented("sft")
