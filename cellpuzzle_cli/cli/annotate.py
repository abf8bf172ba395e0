"""`cellpuzzle annotate`: label a new, unlabeled h5ad with a reference's or a model's types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cellpuzzle_cli.annotate.settings import AnnotateSettings
from cellpuzzle_cli.cli.common import (
    ConfigFile,
    Format,
    ModelDir,
    OutputDir,
    OutputFormat,
    Overwrite,
    Seed,
    TrustRemoteCode,
    console,
    execute,
    given,
    split_args,
)
from cellpuzzle_cli.runner import Outcome, Request


def _candidates(text: str | None) -> list[str] | None:
    """`--candidates "B cells,NK cells"`, or a file of names (one per line, or comma-separated)."""
    if text is None:
        return None
    source = Path(text)
    if source.is_file():
        from cellpuzzle_cli.io import read_text

        text = read_text(source, "candidates file").replace("\n", ",")
    return [name.strip() for name in text.split(",") if name.strip()]


def annotate(
    ctx: typer.Context,
    query: Annotated[list[str], typer.Argument(
        help="The new sample: an .h5ad file or a folder of them (raw counts, log-normalised, or "
             "scaled X with .raw), and key=value settings.", show_default=False)],
    output: OutputDir,
    reference: Annotated[Path | None, typer.Option(
        "--reference", "-r", help="Labelled data to learn from: an .h5ad file or folder "
                                  "(labels in --cell-type-col) or a build-context output folder. "
                                  "hf/vllm: optional (the model's training data gives the "
                                  "candidates).", show_default=False)] = None,
    backend: Annotated[str, typer.Option(
        "--backend", "-b", help="baseline (marker likelihoods fitted on the reference; CPU, "
                                "seconds), celltypist (a CellTypist model trained on the "
                                "reference, or --celltypist-model), hf or vllm (a trained "
                                "cellpuzzle model answering many puzzles; its answers are votes).")]
    = AnnotateSettings.backend,
    model: ModelDir = None,
    cluster_col: Annotated[str | None, typer.Option(
        "--cluster-col", help="obs column with your clusters. Default: cluster here with scanpy "
                              "(normalise, log1p, HVG, PCA, neighbours, Leiden; seeded).",
        show_default=False)] = None,
    candidates: Annotated[str | None, typer.Option(
        "--candidates", help="The cell types to choose from: \"B cells,NK cells,…\" or a file of "
                             "names. Default: every type of the reference (or of the model's "
                             "training data).", show_default=False)] = None,
    cell_type_col: Annotated[str, typer.Option(
        "--cell-type-col", help="The reference's label column (as build-context reads it).")]
    = AnnotateSettings.cell_type_col,
    gene_col: Annotated[str | None, typer.Option(
        "--gene-col", help="var column with gene symbols, in query and reference. Default: "
                           "feature_name when present, else the var names.",
        show_default=False)] = None,
    min_confidence: Annotated[float, typer.Option(
        "--min-confidence", help="Cells below this confidence (0-1) are 'unassigned'.")]
    = AnnotateSettings.min_confidence,
    one_to_one: Annotated[bool, typer.Option(
        "--one-to-one", help="Each candidate to at most one cluster (Hungarian assignment over "
                             "the cluster × candidate scores).")] = AnnotateSettings.one_to_one,
    truth_col: Annotated[str | None, typer.Option(
        "--truth-col", help="An obs column of the query with known labels to compare with at "
                            "the end (agreement, macro-F1, chance); never used to annotate.",
        show_default=False)] = None,
    celltypist_model: Annotated[Path | None, typer.Option(
        "--celltypist-model", help="A CellTypist model file (.pkl) to use instead of training "
                                   "one on the reference.", show_default=False)] = None,
    seed: Seed = AnnotateSettings.seed,
    config: ConfigFile = None,
    overwrite: Overwrite = False,
    trust_remote_code: TrustRemoteCode = False,
    fmt: Format = OutputFormat.human,
) -> None:
    """Label a new, unlabeled sample: every cell gets a type, a confidence and its cluster.

    Writes into the output folder the query with nothing changed or lost plus obs
    [bold]cellpuzzle_label[/bold] ('unassigned' where no candidate fits or confidence is below
    --min-confidence), [bold]cellpuzzle_confidence[/bold], [bold]cellpuzzle_cluster[/bold] and
    uns['cellpuzzle']; clusters.tsv (one row per cluster: label, confidence, runner-up, the
    marker genes behind it); annotate.png (the embedding coloured by label) and annotate.yaml.

    Example: [bold]cellpuzzle annotate sample.h5ad --reference atlas.h5ad -o annotated/[/bold]

    Example: [bold]cellpuzzle annotate sample.h5ad --backend hf --model rl-model -o ann/[/bold]
    """
    files, overrides = split_args(query)
    if not files:
        from cellpuzzle_cli.errors import UserError

        raise UserError("No query given. Pass the .h5ad file (or folder) to annotate, e.g. "
                        "`cellpuzzle annotate sample.h5ad --reference atlas.h5ad -o annotated/`.")
    options = given(ctx, backend=backend, cluster_col=cluster_col, cell_type_col=cell_type_col,
                    gene_col=gene_col, min_confidence=min_confidence, one_to_one=one_to_one,
                    celltypist_model=celltypist_model, seed=seed, truth_col=truth_col)
    if candidates is not None:
        options["candidates"] = _candidates(candidates)
    flags = {"trust_remote_code": trust_remote_code}
    execute(ctx, Request("annotate", {"query": files, "reference": reference, "model": model},
                         output, options, overrides, config, overwrite, flags), fmt, _print)


def _print(outcome: Outcome) -> None:
    from rich import box
    from rich.table import Table

    result = outcome.result
    table = Table(box=box.SIMPLE_HEAD, title_justify="left",
                  title=f"annotate ({result.backend}): {result.cells:,} cells → {result.out_dir}")
    for column in ("file", "cells", "clusters", "assigned", "mean confidence", "top labels"):
        table.add_column(column, justify="left" if column in ("file", "top labels") else "right")
    for f in result.files:
        top = ", ".join(f"{name} {count:,}" for name, count in
                        sorted(f.labels.items(), key=lambda kv: -kv[1])[:4])
        table.add_row(f.output, f"{f.cells:,}", str(f.clusters), f"{f.assigned:,}",
                      f"{f.mean_confidence:.2f}", top)
    console.print(table)
    for line in result.evaluation_lines():
        console.print(line)
