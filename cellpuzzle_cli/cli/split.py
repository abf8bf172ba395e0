"""`cellpuzzle split`: Leakage-free, N-stratified train/test split of puzzles."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def split(ctx: typer.Context) -> None:
    """Leakage-free, N-stratified train/test split of puzzles."""
    not_implemented("split")
