"""`cellpuzzle predict`: Model answers for puzzles (vLLM, transformers or the classical baseline)."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def predict(ctx: typer.Context) -> None:
    """Model answers for puzzles (vLLM, transformers or the classical baseline)."""
    not_implemented("predict")
