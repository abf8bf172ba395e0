"""`cellpuzzle make-qa`: Cells to CellPuzzles: N cells, N candidate types, one donor."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def make_qa(ctx: typer.Context) -> None:
    """Cells to CellPuzzles: N cells, N candidate types, one donor."""
    not_implemented("make-qa")
