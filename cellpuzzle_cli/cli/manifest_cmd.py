"""`cellpuzzle manifest`: show the artifact ledger as a table."""

from __future__ import annotations

from typing import Annotated

import typer

from cellpuzzle_cli.cli.common import FORMAT, Format, OutputFormat, console, manifest


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def show(
    ctx: typer.Context,
    command: Annotated[str, typer.Option("--command", help="Only runs of this command.")] = "",
    last: Annotated[int, typer.Option("--last", min=0, help="Only the last N runs (0: all).")] = 0,
    fmt: Format = OutputFormat.human,
) -> None:
    """Show the runs recorded in the manifest: what made which file, from what.

    Example: [bold]cellpuzzle manifest --command split --last 3[/bold]
    """
    from rich.table import Table

    m = manifest(ctx)
    entries = [e for e in m.entries() if not command or e.command == command]
    if last:
        entries = entries[-last:]
    if fmt is OutputFormat.json:
        import sys

        import orjson

        FORMAT.set(fmt.value)
        sys.stdout.write(orjson.dumps({"manifest": str(m.path),
                                       "entries": [e.to_dict() for e in entries]}).decode() + "\n")
        return
    table = Table(title=f"{m.path} — {len(entries)} run(s)")
    for col in ("finished", "command", "inputs", "outputs", "duration"):
        table.add_column(col)
    for e in entries:
        ins = "\n".join(a.path for a in e.inputs)
        outs = "\n".join(f"{a.name}: {a.path} ({a.nfiles} files, {_size(a.size)}, "
                         f"{(a.sha256 or '')[:10]})" for a in e.outputs)
        table.add_row(e.finished[:19], e.command, ins, outs, f"{e.duration_s:.1f}s")
    console.print(table)
