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


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A failure the user can fix (see `errors.explain`) exits 2 with one paragraph;
    a bug keeps its traceback. CELLPUZZLE_DEBUG=1 shows the traceback for both."""
    from cellpuzzle_cli.cli.app import app
    from cellpuzzle_cli.cli.common import ARGV, FORMAT

    ARGV.set(tuple(sys.argv[1:] if argv is None else argv))
    FORMAT.set("human")
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
