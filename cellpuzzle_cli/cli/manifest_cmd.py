"""`cellpuzzle manifest`: show the artifact ledger as a table that fits the terminal.

By default one row per run fits the console's width (80 columns included): the full date and
time it finished, the command, what it read (←) and wrote (→) with paths shortened from the
left (the file name is what tells them apart), and how long it took. `--wide` shows everything
(ids, full paths, file counts, sizes, hashes) at the table's natural width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from cellpuzzle_cli.cli.common import FORMAT, Format, OutputFormat, console, manifest

if TYPE_CHECKING:
    from rich.table import Table

    from cellpuzzle_cli.manifest import Entry, Recorded

_STAMP = 19            # "2025-01-31 12:34:56"
_MAX_LISTED = 3        # compact rows list this many inputs (and outputs), then "+N more"
_MIN_FILES_WIDTH = 16
_DECORATION = 9        # the compact table's padding and column rules, in columns


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def stamp(iso: str) -> str:
    """`2025-01-31T12:34:56.789+00:00` -> `2025-01-31 12:34:56` (UTC, as recorded)."""
    return iso[:_STAMP].replace("T", " ")


def shorten_left(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut from the left: a path keeps its file name and
    as much of the folders above it as fits (`…-baseline/shard-0-of-1.jsonl`)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _listed(arrow: str, items: tuple[Recorded, ...], width: int) -> list[str]:
    lines = [f"{arrow} {shorten_left(a.path, width - 2)}" for a in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"{arrow} (+{len(items) - _MAX_LISTED} more; --wide lists them)")
    return lines


def compact_table(entries: list[Entry], title: str, width: int) -> Table:
    """One row per run within `width` columns: full timestamps, paths shortened from the left."""
    from rich import box
    from rich.table import Table

    commands = max([len("command"), *(len(e.command) for e in entries)])
    took = max([len("took"), *(len(_duration(e.duration_s)) for e in entries)])
    files = max(_MIN_FILES_WIDTH, width - _STAMP - commands - took - _DECORATION)
    table = Table(title=shorten_left(title, width), box=box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=False, title_justify="left")
    table.add_column("finished (UTC)", no_wrap=True, min_width=_STAMP)
    table.add_column("command", no_wrap=True)
    table.add_column("read ← / wrote →", no_wrap=True, max_width=files, overflow="ellipsis")
    table.add_column("took", no_wrap=True, justify="right")
    for e in entries:
        lines = _listed("←", e.inputs, files) + _listed("→", e.outputs, files)
        table.add_row(stamp(e.finished), e.command, "\n".join(lines) or "-",
                      _duration(e.duration_s))
    return table


def wide_table(entries: list[Entry], title: str) -> Table:
    """Everything the ledger says of each run, nothing shortened."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("id", "started (UTC)", "finished (UTC)", "command", "inputs", "outputs",
                "duration"):
        table.add_column(col, no_wrap=True)
    for e in entries:
        ins = "\n".join(f"{a.name}: {a.path}" + (f" ({(a.sha256 or '')[:12]})" if a.sha256
                                                  else "") for a in e.inputs)
        outs = "\n".join(f"{a.name}: {a.path} ({a.nfiles} files, {_size(a.size)}, "
                         f"{(a.sha256 or '')[:12]})" for a in e.outputs)
        table.add_row(e.id, stamp(e.started), stamp(e.finished), e.command, ins, outs,
                      f"{e.duration_s:.1f}s")
    return table


def show(
    ctx: typer.Context,
    command: Annotated[str, typer.Option("--command", help="Only runs of this command.")] = "",
    last: Annotated[int, typer.Option("--last", min=0, help="Only the last N runs (0: all).")] = 0,
    wide: Annotated[bool, typer.Option(
        "--wide", help="Everything: run ids, start times, full paths, file counts, sizes and "
                       "hashes, at the table's full width (pipe to `less -S`).")] = False,
    fmt: Format = OutputFormat.human,
) -> None:
    """Show the runs recorded in the manifest: what made which file, from what.

    The table fits the terminal: full timestamps, paths shortened from the left (…/name).

    Example: [bold]cellpuzzle manifest --command split --last 3[/bold]
    """
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
    title = f"{m.path} — {len(entries)} run(s)"
    if wide:
        table = wide_table(entries, title)
        from rich.console import Console

        natural = console.measure(table, options=console.options.update_width(100_000))
        Console(width=max(console.width, natural.maximum)).print(table)
    else:
        console.print(compact_table(entries, title, console.width))
