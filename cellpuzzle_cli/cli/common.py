"""What every command shares: option aliases, the manifest, consoles, progress bars.

Command modules only parse options, call one service, print its result and record the run.
Nothing heavy is imported here, so `cellpuzzle --help` stays instant.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.manifest import Artifact, Manifest

console = Console()
err_console = Console(stderr=True)

# -- shared option aliases ---------------------------------------------------------------
OutputDir = Annotated[Path, typer.Option("--output", "-o", help="Output folder.")]
OptionalOutputDir = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an output folder that already holds results.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for every random choice; same seed, same bytes.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value config overrides.", show_default=False)]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped inside a model folder (off by default: model folders come from strangers).")]


# `rl` records its runs under the subcommand's full name.
RL_COMMANDS = ("rl grpo", "rl ppo")


def manifest(ctx: typer.Context) -> Manifest:
    """The manifest chosen with the global `--manifest` option."""
    return ctx.find_root().obj["manifest"]


def input_or_latest(ctx: typer.Context, given: Path | None, commands: str | tuple[str, ...],
                    what: str, name: str | None = None) -> Path:
    """The user's input, else the latest matching output recorded in the manifest."""
    if given is not None:
        return given
    m = manifest(ctx)
    found = m.latest_output(commands, name)
    if found is None:
        steps = commands if isinstance(commands, str) else " or ".join(commands)
        raise UserError(f"No {what} given and the manifest {m.path} records no `{steps}` run to "
                        f"take it from. Pass the {what} explicitly, or run `cellpuzzle {steps}` first.")
    if not found.exists():
        raise UserError(f"The manifest {m.path} points to {found} for the {what}, but it no longer "
                        "exists. Pass the input explicitly or re-run the step that made it.")
    err_console.print(f"[dim]Using {what} from the manifest: {found}[/dim]")
    return found


def record(ctx: typer.Context, command: str, params: dict[str, Any], started: float,
           inputs: Iterable[Path | Artifact], outputs: Iterable[Path | Artifact],
           extra: dict[str, Any] | None = None) -> None:
    """Append this run to the manifest."""
    def art(x: Path | Artifact, default: str) -> Artifact:
        return x if isinstance(x, Artifact) else Artifact(Path(x), default)

    manifest(ctx).record(command, _jsonable(params), [art(i, "input") for i in inputs],
                         [art(o, "output") for o in outputs], started, extra=extra)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def start() -> float:
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

