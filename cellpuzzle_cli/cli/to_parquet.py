"""`cellpuzzle to-parquet`: Training puzzles to verl's RL Parquet format."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def to_parquet(ctx: typer.Context) -> None:
    """Training puzzles to verl's RL Parquet format."""
    not_implemented("to-parquet")
