"""`score`'s tables for the metric families beyond Cell-o1's: chance, per type, ontology.

Rendering only: every number comes from the reports `scoring` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chance_cell(metrics: dict[str, Any] | None) -> str:
    """The By-N table's chance column, per cell / per puzzle (1/N and 1/N! for closed puzzles)."""
    if not metrics:
        return "-"
    return f"{metrics['chance_cell_accuracy']:.3f} / {metrics['chance_exact_match']:.3g}"


def print_gap_table(console: Any, reports: Sequence[Any]) -> None:
    """By N, each run's gap to the optimum (1 − exact match) beside chance's: what a change
    such as a curriculum does to large puzzles reads at a glance."""
    from rich.table import Table

    title = "By N: gap to the optimum, 1 − exact match (lower is better)"
    table = Table(title=title, title_justify="left", min_width=len(title))
    table.add_column("N", justify="right")
    for r in reports:
        table.add_column(r.name, justify="right")
    table.add_column("chance", justify="right", style="dim")
    for n in sorted({k for r in reports for k in r.by_n}):
        rows = [r.by_n.get(n) for r in reports]
        chance = next((m["chance_gap_to_optimum"] for m in rows if m), None)
        table.add_row(str(n), *[f"{m['gap_to_optimum']:.3f}" if m else "-" for m in rows],
                      "-" if chance is None else f"{chance:.3f}")
    console.print(table)


def print_family_tables(console: Any, reports: Sequence[Any]) -> None:
    """Chance, macro-F1 and hierarchical metrics side by side, then per-type F1 per run."""
    from rich.table import Table

    table = Table(title="Against chance, per type and over the Cell Ontology",
                  title_justify="left")
    table.add_column("metric")
    for r in reports:
        table.add_column(r.name, justify="right")
    table.add_row("Cell accuracy (chance)",
                  *[f"{r.overall['cell_accuracy']:.4f} ({r.overall['chance_cell_accuracy']:.4f})"
                    for r in reports])
    table.add_row("Exact match (chance)",
                  *[f"{r.overall['exact_match']:.4f} ({r.overall['chance_exact_match']:.2g})"
                    for r in reports])
    table.add_row("Macro-F1 over gold types",
                  *[f"{r.per_type.macro_f1:.4f}" if r.per_type else "-" for r in reports])
    trees = [r.hierarchical for r in reports]
    omitted = [t.omitted for t in trees if t is not None and t.omitted]
    if any(t is not None and t.omitted is None for t in trees):
        for key, label in (("precision", "Hierarchical precision"),
                           ("recall", "Hierarchical recall"), ("f1", "Hierarchical F1")):
            table.add_row(label, *[f"{getattr(t, key):.4f}" if t and t.omitted is None else "-"
                                   for t in trees])
        for rel in ("gold", "ancestor", "descendant", "unrelated", "unmapped", "no_answer"):
            table.add_row(f"  answers: {rel.replace('_', ' ')}",
                          *[f"{t.shares[rel]:.3f}" if t and t.shares else "-" for t in trees])
    console.print(table)
    if omitted:
        console.print(f"[dim]Hierarchical metrics omitted: {omitted[0]}.[/dim]")
    _print_per_type(console, reports)


def _print_per_type(console: Any, reports: Sequence[Any]) -> None:
    from rich.table import Table

    runs = [r for r in reports if r.per_type is not None]
    if not runs:
        return
    table = Table(title="Per gold type: F1 (precision / recall), support", title_justify="left")
    table.add_column("type")
    table.add_column("support", justify="right")
    for r in runs:
        table.add_column(r.name, justify="right")
    types = list(dict.fromkeys(t for r in runs for t in r.per_type.types))
    for name in types:
        cells, support = [], "-"
        for r in runs:
            pt = r.per_type
            if name not in pt.types:
                cells.append("-")
                continue
            i = pt.types.index(name)
            support = str(int(pt.support[i]))
            cells.append(f"{pt.f1[i]:.3f} ({pt.precision[i]:.2f} / {pt.recall[i]:.2f})")
        table.add_row(name, support, *cells)
    console.print(table)
