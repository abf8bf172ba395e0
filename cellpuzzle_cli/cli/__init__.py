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


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A failure the user can fix (see `errors.explain`) exits 2 with one paragraph;
    a bug keeps its traceback. CELLPUZZLE_DEBUG=1 shows the traceback for both."""
    from cellpuzzle_cli.cli.app import app
    from cellpuzzle_cli.cli.common import ARGV, FORMAT

    ARGV.set(tuple(sys.argv[1:] if argv is None else argv))
    FORMAT.set("human")
    _clean_exit_on_sigterm()
    try:
        app(args=argv, prog_name="cellpuzzle")
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        message = explain(exc)
        if message is None or os.environ.get("CELLPUZZLE_DEBUG") == "1":
            raise
        _report(message)
        if FORMAT.get() == "json":  # scripts reading stdout learn of the failure there too
            import orjson

            sys.stdout.write(orjson.dumps({"state": "error", "error": message,
                                           "exit_code": EXIT_USER_ERROR}).decode() + "\n")
        sys.exit(EXIT_USER_ERROR)
