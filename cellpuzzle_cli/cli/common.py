"""What every command shares: option aliases, the manifest, consoles, progress bars.

Command modules only parse options, call one service, print its result and record the run.
Nothing heavy is imported here, so `cellpuzzle --help` stays instant.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from cellpuzzle_cli.manifest import Artifact, Kind, Manifest, RunRecord, Step

T = TypeVar("T")
R = TypeVar("R")
console = Console()
err_console = Console(stderr=True)

# -- shared option aliases ---------------------------------------------------------------
OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
OptionalOutputDir = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an output folder that already holds results.")]
# The arguments of this invocation (commands that relaunch themselves need them).
ARGV: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("argv", default=())
_SEED_HELP = "Seed for every random choice (0 to 4294967295); same seed, same bytes."
Seed = Annotated[int, typer.Option("--seed", help=_SEED_HELP)]
# For config-driven commands, where the seed otherwise comes from the config's `seed` key.
OptionalSeed = Annotated[int | None, typer.Option("--seed", help=_SEED_HELP + " Default: the "
                                                  "config's seed key.", show_default=False)]
ConfigFile = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML settings file, e.g. the <command>.yaml a previous run saved "
                           "beside its output; options and key=value overrides win over it.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value config overrides.", show_default=False)]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped inside a model folder (off by default: model folders come from strangers).")]


def manifest(ctx: typer.Context) -> Manifest:
    """The manifest chosen with the global `--manifest` option."""
    return ctx.find_root().obj["manifest"]


def input_or_latest(ctx: typer.Context, given: Path | None, kind: Kind, what: str) -> Path:
    """The user's input, else the newest recorded artifact of `kind` (said on stderr)."""
    resolved = manifest(ctx).input_or_latest(given, kind, what)
    say(resolved.note(what))
    return resolved.path


def say(*notes: str | None) -> None:
    """Service notes (e.g. which input the manifest supplied), dimmed on stderr."""
    from rich.markup import escape

    for note in notes:
        if note:
            err_console.print(f"[dim]{escape(note)}[/dim]")


def record(ctx: typer.Context, command: str, params: dict[str, Any], started: float,
           inputs: Iterable[Path | Artifact], outputs: Iterable[Path | Artifact],
           extra: dict[str, Any] | None = None) -> None:
    """Append this run to the manifest."""
    def art(x: Path | Artifact, default: str) -> Artifact:
        return x if isinstance(x, Artifact) else Artifact(Path(x), default)

    manifest(ctx).record(command, params, [art(i, "input") for i in inputs],
                         [art(o, "output") for o in outputs], started, extra=extra)


def record_run(ctx: typer.Context, command: str, run: RunRecord, started: float) -> None:
    """Append a run a service described (see `manifest.RunRecord`)."""
    manifest(ctx).record(command, run.params, run.inputs, run.outputs, started, extra=run.extra)


def step_settings(ctx: typer.Context, cls: type[T], config: Path | None, **options: Any) -> T:
    """A step's settings: dataclass defaults < `--config` YAML < options given on the command
    line (an option left at its default does not override the file)."""
    from cellpuzzle_cli.config import build_config

    def on_command_line(name: str) -> bool:  # by name: Typer ships its own copy of click
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return build_config(cls, config, {k: v for k, v in options.items() if on_command_line(k)})


def begin_step(ctx: typer.Context, command: str, params: dict[str, Any],
               inputs: list[Artifact], outputs: list[Artifact], folder: Path,
               overwrite: bool) -> Step | None:
    """The step about to write `folder`, or None when that folder already holds this very run
    (up to date, or finished but unrecorded because the run was killed: recorded now)."""
    step = manifest(ctx).step(command, params, inputs, outputs, folder)
    state = "new" if overwrite else step.state()
    if state == "up to date":
        console.print(f"[bold]{folder} is up to date[/bold]: this `{command}` run made it from the "
                      "same inputs and settings, and it is unchanged since. Nothing to do.")
        return None
    if state == "unrecorded":
        step.record(time.time(), {"recovered": True})
        console.print(f"[bold]{folder} was already made[/bold] by an interrupted `{command}` run "
                      "with these inputs and settings; it is recorded in the manifest now.")
        return None
    return step


def run_step(ctx: typer.Context, started: float, command: str, *, params: dict[str, Any],
             inputs: list[Artifact], outputs: list[Artifact], folder: Path, overwrite: bool,
             work: Callable[[Callable[..., None]], R], label: str, unit: str = "",
             main: bool = True) -> R | None:
    """One folder-writing step: nothing to do when `folder` already holds this very run (see
    `begin_step`); else `work(progress)` runs with the run's stamp on what it publishes, and the
    run is recorded with the result's `summary()` when it has one. None when skipped.

    `main=False` (torchrun's other processes) works alike but says and records nothing."""
    if not main:
        step = manifest(ctx).step(command, params, inputs, outputs, folder)
        return None if not overwrite and step.state() != "new" else work(lambda *a, **k: None)
    step = begin_step(ctx, command, params, inputs, outputs, folder, overwrite)
    if step is None:
        return None
    with step.publishing(), progress_bar(label, unit=unit) as update:
        result = work(update)
    summary = getattr(result, "summary", None)
    step.record(started, {"summary": summary()} if callable(summary) else None)
    return result


def start(ctx: typer.Context) -> float:
    """The run's start time, after checking that the manifest can be read (before any work)."""
    manifest(ctx).check()
    return time.time()


def quiet_libraries() -> None:
    """Our progress bar replaces the libraries' own bars and info logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
        if total is not None:
            kwargs["total"] = total
        if description is not None:
            kwargs["description"] = description
        progress.update(task, **kwargs)

    try:
        yield update
    finally:
        if progress.live.is_started:
            progress.stop()

