"""The one exception type for user mistakes.

Services raise `UserError` for anything the user can fix (a missing file, a wrong column,
a bad shard spec). The CLI prints its message as one paragraph and exits with code 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input, with a message that names the fix."""

    exit_code = EXIT_USER_ERROR


def existing_path(path, what: str = "input"):
    """Return `path` as a Path, or fail with a message naming it when it does not exist."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise UserError(f"The {what} '{p}' does not exist. Check the path (it is resolved "
                        f"relative to the current directory, {Path.cwd()}).")
    return p
