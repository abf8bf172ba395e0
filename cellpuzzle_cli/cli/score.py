"""`cellpuzzle score`: Cell-o1 metrics for prediction files."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def score(ctx: typer.Context) -> None:
    """Cell-o1 metrics for prediction files."""
    not_implemented("score")
