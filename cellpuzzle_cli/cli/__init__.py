"""The `cellpuzzle` entry point: the Typer app and the one place errors become messages."""

from __future__ import annotations

import os
import sys

from cellpuzzle_cli.errors import UserError


def _report(exc: UserError) -> None:
    from rich.markup import escape
    from rich.panel import Panel

    from cellpuzzle_cli.cli.common import err_console

    err_console.print(Panel(escape(str(exc)), title="cellpuzzle: error", title_align="left",
                            border_style="red", expand=False))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user mistakes exit 2 with a message, tracebacks only with CELLPUZZLE_DEBUG=1."""
    from cellpuzzle_cli.cli.app import app

    try:
        app(args=argv, prog_name="cellpuzzle")
    except UserError as exc:
        if os.environ.get("CELLPUZZLE_DEBUG") == "1":
            raise
        _report(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
