"""`cellpuzzle build-context`: Per-cell top genes and donor context from .h5ad files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.build_context import ContextSettings
from cellpuzzle_cli.cli.common import (
    ConfigFile,
    Format,
    OutputDir,
    OutputFormat,
    Overwrite,
    Seed,
    console,
    execute,
    given,
    split_args,
)
from cellpuzzle_cli.runner import Request


def build_context(
    ctx: typer.Context,
    inputs: Annotated[list[str], typer.Argument(
        help=".h5ad files and/or folders (searched recursively), and key=value settings.",
        show_default=False)],
    output: OutputDir,
    top_genes: Annotated[int, typer.Option(
        "--top-genes", help="Genes listed per cell, highest expression first.")]
    = ContextSettings.top_genes,
    cell_type_col: Annotated[str, typer.Option(
        "--cell-type-col", help="obs column with the cell type (the puzzle's answer).")]
    = ContextSettings.cell_type_col,
    cell_type_id_col: Annotated[str | None, typer.Option(
        "--cell-type-id-col", help="obs column with the cell type's ontology ID, kept for "
                                   "ontology-aware scoring. Default: cell_type_ontology_term_id "
                                   "when present.", show_default=False)] = None,
    donor_col: Annotated[str | None, typer.Option(
        "--donor-col", help="obs column with the donor. Default: donor_id when present, else "
                            "each file is one donor group (with a warning).",
        show_default=False)] = None,
    donor_from_id: Annotated[str | None, typer.Option(
        "--donor-from-id", help="A regular expression searched in each cell id whose first "
                                "group is the donor, for data whose donor lives only in the "
                                "ids: '^([^_]+)_' takes MGH36 from MGH36_A01. A cell id that "
                                "does not match is an error naming it.", show_default=False)]
    = None,
    batch_col: Annotated[str | None, typer.Option(
        "--batch-col", help="obs column with a batch/sample to split donor groups by. Default: "
                            "none (CELLxGENE has no batch column; batch_id stays empty).",
        show_default=False)] = None,
    gene_col: Annotated[str | None, typer.Option(
        "--gene-col", help="var column with gene symbols. Default: feature_name when present, "
                           "else the var names.", show_default=False)] = None,
    rename: Annotated[list[str] | None, typer.Option(
        "--rename", help="Rename a cell type: OLD=NEW (repeatable; an empty NEW drops those "
                         "cells). See 'Cell type labels' in the README.",
        show_default=False)] = None,
    label_map: Annotated[Path | None, typer.Option(
        "--label-map", help="TSV of cell type renames, one OLD<TAB>NEW line each.",
        show_default=False)] = None,
    max_cells: Annotated[int | None, typer.Option(
        "--max-cells", help="Keep at most this many cells per file, chosen with --seed.",
        show_default=False)] = None,
    seed: Seed = ContextSettings.seed,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Worker processes reading the matrix (files and row chunks in "
                          "parallel). Default: one per CPU core, up to 8.",
        show_default=False)] = None,
    context_config: Annotated[Path | None, typer.Option(
        "--context-config", help="YAML with the context fields and wording. Default: the "
                                 "shipped configs/context_fields.yaml.", show_default=False)]
    = None,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    fmt: Format = OutputFormat.human,
) -> None:
    """Per-cell top genes and donor context from .h5ad files.

    Writes one Parquet cell table per input file under the output folder,
    mirroring input folders, plus build-context.yaml with the settings
    (reloadable with --config).

    Keeps only suspension_type == "cell" where that column exists and drops
    cells without a cell type or without an expressed gene. When X is scaled
    (negative values), genes are ranked on .raw.X or layers['counts'] instead.
    Cell type labels are tidied (white space, Unicode, case) and refused when
    no answer could name them; --rename or --label-map fixes them.

    Example: [bold]cellpuzzle build-context data/ -o cells/ --max-cells 20000[/bold]

    Example: [bold]cellpuzzle build-context data/ -o cells/ top_genes=20[/bold]
    """
    files, overrides = split_args(inputs)
    if not files:
        from cellpuzzle_cli.errors import UserError

        raise UserError("No .h5ad files or folders given. Pass at least one, e.g. "
                        "`cellpuzzle build-context data/ -o cells/`.")
    options = given(ctx, top_genes=top_genes, cell_type_col=cell_type_col,
                    cell_type_id_col=cell_type_id_col, donor_col=donor_col,
                    donor_from_id=donor_from_id, batch_col=batch_col,
                    gene_col=gene_col, max_cells=max_cells, seed=seed, workers=workers,
                    context_config=context_config, rename=rename, label_map=label_map)
    execute(ctx, Request("build-context", {"h5ad": files}, output, options, overrides, config,
                         overwrite), fmt, lambda outcome: _print_summary(outcome.result))


def _print_summary(result) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title_justify="left", caption_justify="left",
                  title=f"build-context: {result.cells:,} cells from {len(result.files)} file(s) "
                        f"→ {result.out_dir} ({result.seconds:.1f} s, "
                        f"{result.workers} worker(s))",
                  caption="dropped = nucleus (suspension_type not 'cell') / no cell type / "
                          "over --max-cells / no expressed gene")
    table.add_column("file", overflow="fold")
    table.add_column("kept/read", justify="right", no_wrap=True)
    table.add_column("dropped", justify="right", no_wrap=True)
    table.add_column("donors/types", justify="right", no_wrap=True)
    table.add_column("matrix: holds", min_width=14)
    table.add_column("cells/s", justify="right")
    for f in result.files:
        table.add_row(f.output, f"{f.cells_kept:,}/{f.cells_read:,}",
                      f"{f.dropped_suspension:,}/{f.dropped_nan_type:,}/{f.dropped_subsample:,}/"
                      f"{f.dropped_no_expression:,}",
                      f"{f.donors}/{f.cell_types}", f"{f.matrix}: {f.holds}",
                      f"{f.cells_per_s:,.0f}")
    console.print(table)
