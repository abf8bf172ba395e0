"""`cellpuzzle build-context`: Per-cell top genes and donor context from .h5ad files."""

from __future__ import annotations

import typer

from cellpuzzle_cli.cli.common import not_implemented


def build_context(ctx: typer.Context) -> None:
    """Per-cell top genes and donor context from .h5ad files."""
    not_implemented("build-context")
