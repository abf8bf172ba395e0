"""`cellpuzzle init-model`: A tiny from-scratch model for offline tests and demos."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def init_model(ctx: typer.Context) -> None:
    """A tiny from-scratch model for offline tests and demos."""
    not_implemented("init-model")
