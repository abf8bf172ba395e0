"""`cellpuzzle convert-ckpt`: verl FSDP checkpoint shards to a Hugging Face folder."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def convert_ckpt(ctx: typer.Context) -> None:
    """verl FSDP checkpoint shards to a Hugging Face folder."""
    not_implemented("convert-ckpt")
