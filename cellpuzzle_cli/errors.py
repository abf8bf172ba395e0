"""User mistakes and the one map from failures to messages.

Services raise `UserError` for anything the user can fix (a missing file, a wrong column, a bad
shard spec). Failures of the environment or of a file the user named (no permission, disk full,
a folder where a file belongs, text that is not UTF-8, a pickle refused as unsafe) arise deep in
libraries; `explain` turns them into the same kind of paragraph, naming the path and the fix.
The CLI prints either as one paragraph and exits with code 2; any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
from pathlib import Path
from types import TracebackType

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input, with a message that names the fix."""

    exit_code = EXIT_USER_ERROR


def existing_path(path, what: str = "input") -> Path:
    """Return `path` as a Path, or fail with a message naming it when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"The {what} '{p}' does not exist. Check the path (it is resolved "
                        f"relative to the current directory, {Path.cwd()}).")
    return p


def unsafe_pickle_message(path: Path | str | None) -> str:
    """Why a pickled weights file was refused; never suggests turning the safety check off."""
    where = f"'{path}'" if path else "A weights file of the model"
    return (f"{where} is a Python pickle holding more than plain tensors, and loading it could run "
            "code, so it was refused (cellpuzzle loads checkpoints with weights_only=True). Use a "
            "model saved as safetensors (model.safetensors), or re-save the weights as "
            "safetensors on a machine where you trust their source.")


_OS_ERRORS = {
    errno.EACCES: "Permission denied for '{path}'. Check its permissions (ls -l) or use a "
                  "location you may read and write (e.g. another -o folder).",
    errno.EPERM: "The operation is not permitted on '{path}'. Check its permissions, or use "
                 "another location.",
    errno.ENOSPC: "No space left on the device that holds '{path}'. Free some space or write the "
                  "output elsewhere (-o); nothing half-written was kept.",
    errno.EDQUOT: "The disk quota is used up where '{path}' was written. Free some space or write "
                  "the output elsewhere (-o); nothing half-written was kept.",
    errno.ENAMETOOLONG: "The name '{path}' is longer than the file system allows. Choose a "
                        "shorter file or folder name.",
    errno.EROFS: "'{path}' is on a read-only file system. Write the output elsewhere with -o.",
    errno.EISDIR: "'{path}' is a folder, but a file is expected there. Give the path of a file.",
    errno.ENOTDIR: "'{path}' (or a folder on its way) is a file, but a folder is expected there. "
                   "Check the path.",
}
_PATH_LOCALS = ("path", "filename", "file", "checkpoint_file", "tmp", "out", "target", "dst")


def _frames(tb: TracebackType | None):
    """Frames of a traceback, innermost first."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return reversed(frames)


def _path_in_traceback(exc: BaseException) -> str | None:
    """A file path the failing code was working on, when the exception does not carry one."""
    for frame in _frames(exc.__traceback__):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, Path)) and str(value) and "/" in str(value):
                return str(value)
    return None


def explain(exc: BaseException) -> str | None:
    """The message for a failure the user can fix, or None for a bug (which keeps its traceback)."""
    import pickle

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        return unsafe_pickle_message(_path_in_traceback(exc))
    if isinstance(exc, UnicodeDecodeError):
        where = _path_in_traceback(exc)
        return (f"{f'{where!r}' if where else 'An input file'} is not UTF-8 text "
                f"({exc.reason} at byte {exc.start}). Save it as UTF-8 and run again.")
    if isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        # os.replace(src, dst) names dst second: the place the user chose
        path = exc.filename2 or exc.filename or _path_in_traceback(exc) or "the output"
        return _OS_ERRORS[exc.errno].format(path=path)
    return None
