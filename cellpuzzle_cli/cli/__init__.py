"""The `cellpuzzle` entry point: the Typer app and the one place errors become messages."""

from __future__ import annotations

import os
import sys

from cellpuzzle_cli.errors import EXIT_USER_ERROR, explain


def _report(message: str) -> None:
    from rich.markup import escape
    from rich.panel import Panel

    from cellpuzzle_cli.cli.common import err_console

    err_console.print(Panel(escape(message), title="cellpuzzle: error", title_align="left",
                            border_style="red", expand=False))


def _clean_exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's or `kill`'s) unwinds like Ctrl-C, so half-written outputs are
    removed on the way out instead of waiting for the next run to find them."""
    import signal

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (an embedding program's): leave its handlers be
        pass


def _wants_json(args: tuple[str, ...]) -> bool:
    """`--format json` among the arguments (known before the command's options are parsed, so
    a usage error can answer in JSON too)."""
    return any(a == "--format=json" or (a == "--format" and b == "json")
               for a, b in zip(args, (*args[1:], "")))


def _json_error(message: str, code: int) -> None:
    """The failure as the one JSON object a `--format json` caller reads on stdout."""
    import orjson

    sys.stdout.write(orjson.dumps({"state": "error", "error": message,
                                   "exit_code": code}).decode() + "\n")


def _run(app: object, argv: list[str] | None, json: bool) -> None:
    """The Typer app; with `--format json`, usage errors (a missing option, a bad value) are
    also reported on stdout as JSON, after Typer's own message on stderr."""
    if not json:
        app(args=argv, prog_name="cellpuzzle")  # type: ignore[operator]
        return
    from typer import rich_utils
    from typer.exceptions import Abort, TyperException  # Typer's own click: catch its classes

    try:
        code = app(args=argv, prog_name="cellpuzzle", standalone_mode=False)  # type: ignore[operator]
    except TyperException as exc:
        rich_utils.rich_format_error(exc)  # type: ignore[arg-type]
        _json_error(exc.format_message(), exc.exit_code)
        sys.exit(exc.exit_code)
    except Abort:
        _json_error("Aborted.", 1)
        sys.exit(1)
    if isinstance(code, int) and code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A failure the user can fix (see `errors.explain`) exits 2 with one paragraph;
    a bug keeps its traceback. CELLPUZZLE_DEBUG=1 shows the traceback for both. With `--format
    json`, every failure is also one JSON object on stdout (a bug's names the exception)."""
    from cellpuzzle_cli.cli.app import app
    from cellpuzzle_cli.cli.common import ARGV, FORMAT

    args = tuple(sys.argv[1:] if argv is None else argv)
    ARGV.set(args)
    FORMAT.set("json" if _wants_json(args) else "human")
    _clean_exit_on_sigterm()
    try:
        _run(app, argv, FORMAT.get() == "json")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        message = explain(exc)
        if message is None or os.environ.get("CELLPUZZLE_DEBUG") == "1":
            if FORMAT.get() == "json":
                _json_error(f"internal error: {type(exc).__name__}: {exc} (a bug; the traceback "
                            "is on stderr)", 1)
            raise
        _report(message)
        if FORMAT.get() == "json":  # scripts reading stdout learn of the failure there too
            _json_error(message, EXIT_USER_ERROR)
        sys.exit(EXIT_USER_ERROR)
