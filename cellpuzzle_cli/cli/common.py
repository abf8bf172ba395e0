"""What every command shares: option aliases, the manifest, consoles, progress bars, and
`execute`, which hands a parsed request to the runner and prints the outcome.

Command modules only parse options into a `runner.Request`, call `execute` and say how a
finished run's result reads as text. Nothing heavy is imported here, so `cellpuzzle --help`
stays instant.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from cellpuzzle_cli.manifest import Manifest

if TYPE_CHECKING:
    from cellpuzzle_cli.runner import Outcome, Request

console = Console()
err_console = Console(stderr=True)
# The output format of this invocation: the error handler prints JSON too when it is "json".
FORMAT: contextvars.ContextVar[str] = contextvars.ContextVar("format", default="human")

# -- shared option aliases ---------------------------------------------------------------
class OutputFormat(str, Enum):
    human = "human"
    json = "json"


OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
OptionalOutputDir = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")]
Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an output folder that already holds results.")]
# The arguments of this invocation (commands that relaunch themselves need them).
ARGV: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("argv", default=())
_SEED_HELP = "Seed for every random choice (0 to 4294967295); same seed, same bytes."
Seed = Annotated[int, typer.Option("--seed", help=_SEED_HELP)]
# For config-driven commands, where the seed otherwise comes from the config's `seed` key.
OptionalSeed = Annotated[int | None, typer.Option(
    "--seed", help=_SEED_HELP + " Default: the config's seed key.", show_default=False)]
ConfigFile = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML settings file, e.g. the <command>.yaml a previous run saved "
                           "beside its output; options and key=value overrides win over it.")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="key=value settings (the keys of --config files), e.g. seed=3.", show_default=False)]
Format = Annotated[OutputFormat, typer.Option(
    "--format", help="human: tables and messages; json: the outcome (outputs, counts, "
                     "warnings, timings) as one JSON object on stdout, for scripts and "
                     "workflow managers.")]
ModelDir = Annotated[Path | None, typer.Option(
    "--model", help="Hugging Face model folder (or a hub id already in the local cache). "
                    "Default: the newest model in the manifest.", show_default=False)]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Run Python code shipped inside a model folder (off by default: "
                                "model folders come from strangers).")]


def manifest(ctx: typer.Context) -> Manifest:
    """The manifest chosen with the global `--manifest` option."""
    return ctx.find_root().obj["manifest"]


def given(ctx: typer.Context, **options: Any) -> dict[str, Any]:
    """The options the user set on the command line (an option left at its default does not
    override a `--config` file or a `key=value` override)."""
    def on_command_line(name: str) -> bool:  # by name: Typer ships its own copy of click
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return {k: v for k, v in options.items() if on_command_line(k)}


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.+~-]*=")


def is_override(arg: str | Path | None) -> bool:
    """`key=value` (and no file of that name): a setting, not a path."""
    return arg is not None and bool(_OVERRIDE.match(str(arg))) and not Path(arg).exists()


def split_args(args: list[Any] | None) -> tuple[list[Path], list[str]]:
    """Positional arguments as (paths, key=value overrides): a command whose inputs are
    positional takes its overrides in the same place."""
    args = list(args or [])
    return ([Path(a) for a in args if not is_override(a)],
            [str(a) for a in args if is_override(a)])


def one_path(path: Path | None, overrides: list[str] | None,
             what: str) -> tuple[Path | None, list[str]]:
    """A command's one optional positional path and its `key=value` overrides, in any order."""
    paths, settings = split_args([path, *(overrides or [])] if path is not None else overrides)
    if len(paths) > 1:
        from cellpuzzle_cli.errors import UserError

        raise UserError(f"Several {what} given ({', '.join(map(str, paths))}); give one. "
                        "Settings go as key=value (e.g. seed=3).")
    return (paths[0] if paths else None), settings


def output_file(value: str | None, option: str) -> Path | None:
    """An option that names an output file, as typed: one ending in '/' (or naming a folder)
    asks for a folder, which Path would silently turn into a file of that name."""
    if value is None:
        return None
    if value.endswith(("/", os.sep)) or Path(value).is_dir():
        from cellpuzzle_cli.errors import UserError

        what = "is a folder" if Path(value).is_dir() else "ends in '/', naming a folder"
        raise UserError(f"{option} {value} {what}, but {option} writes one file. Give a "
                        f"file name, e.g. {option} {value.rstrip('/' + os.sep)}/score"
                        f"{'.png' if option == '--plot' else '.' + option.lstrip('-')}.")
    return Path(value)


def say(*notes: str | None) -> None:
    """Service notes (e.g. which input the manifest supplied), dimmed on stderr."""
    from rich.markup import escape

    for note in notes:
        if note:
            err_console.print(f"[dim]{escape(note)}[/dim]")


def warn(*warnings: str, title: str = "warning") -> None:
    """Each warning as a yellow panel on stderr."""
    from rich.markup import escape
    from rich.panel import Panel

    for text in warnings:
        err_console.print(Panel(escape(text), title=title, title_align="left",
                                border_style="yellow", expand=False))


def execute(ctx: typer.Context, request: Request, fmt: OutputFormat,
            show: Callable[[Outcome], None] | None = None) -> Outcome:
    """Run a step through the runner and print its outcome: `show` prints a finished run's
    result as text, `--format json` prints the outcome as one JSON object on stdout."""
    from cellpuzzle_cli.runner import run

    FORMAT.set(fmt.value)
    request.flags.setdefault("allow_changed", ctx.find_root().obj.get("allow_changed", False))
    outcome = run(request, manifest(ctx), progress_bar)
    if not outcome.main:
        return outcome
    if fmt is OutputFormat.json:
        import orjson

        sys.stdout.write(orjson.dumps(outcome.to_json()).decode() + "\n")
    else:
        _show_text(outcome, show)
    if outcome.error is not None:
        raise outcome.error
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)
    return outcome


def _show_text(outcome: Outcome, show: Callable[[Outcome], None] | None) -> None:
    say(*outcome.notes)
    where = outcome.folder or "the output"
    if outcome.state == "up to date":
        console.print(f"[bold]{where} is up to date[/bold]: this `{outcome.command}` run made it "
                      "from the same inputs and settings, and it is unchanged since. Nothing to "
                      "do.")
    elif outcome.state == "recovered":
        console.print(f"[bold]{where} was already made[/bold] by an interrupted "
                      f"`{outcome.command}` run with these inputs and settings; it is recorded "
                      "in the manifest now.")
    elif show is not None and outcome.state in ("done", "dry run"):
        show(outcome)
    warn(*outcome.warnings, title=f"{outcome.command}: warning")


@contextlib.contextmanager
def progress_bar(description: str, total: float | None = None,
                 unit: str = "") -> Iterator[Callable[..., None]]:
    """A rich progress bar on stderr; yields `update(advance=1, total=None, description=None)`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=err_console, transient=False)
    task = progress.add_task(description, total=total)

    # Shown from the first update on, so a run that fails while checking its input prints
    # only the error, not an empty bar.
    def update(advance: float = 1, total: float | None = None,
               description: str | None = None) -> None:
        if not progress.live.is_started:
            progress.start()
        kwargs: dict[str, Any] = {"advance": advance}
        if total is not None:   # a new phase (see io.Progress): it starts at `advance`
            kwargs = {"total": total, "completed": advance}
        if description is not None:
            kwargs["description"] = description
        progress.update(task, **kwargs)

    try:
        yield update
    finally:
        if progress.live.is_started:
            progress.stop()

