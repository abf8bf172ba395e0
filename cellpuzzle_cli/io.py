"""Reading and writing the project's file formats, always atomically.

Readers accept what users hold: JSONL, a JSON array (the original Cell-o1 scripts' files)
and Parquet (the published CellPuzzles dataset). Writers never leave a half-written file:
they write beside the target and rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli.errors import UserError, existing_path

_UMASK = os.umask(0)
os.umask(_UMASK)
# What services accept to report progress: `progress(advance, total=…, description=…)`.
Progress = Callable[..., None]
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp alone gives 0600


def labelled(progress: Progress | None, label: str) -> Progress | None:
    """`progress` that shows `label` from its first update on (a bar appears only once work
    starts, so a run that fails while checking its input shows just the error)."""
    if progress is None:
        return None
    first = True

    def update(advance: float = 1, total: float | None = None,
               description: str | None = None) -> None:
        nonlocal first
        if first and description is None:
            description = label
        first = False
        progress(advance, total=total, description=description)

    return update


def dumps_line(record: dict[str, Any]) -> bytes:
    """One JSONL line; sorted keys would reorder the contract's columns, so keep insertion order."""
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records as JSONL atomically; returns the number written."""
    count = 0
    chunks = []
    for rec in records:
        chunks.append(dumps_line(rec))
        count += 1
    atomic_write_bytes(path, b"".join(chunks))
    return count


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise UserError(f"{path}, line {lineno} is not valid JSON ({exc}). The file may be "
                                "truncated or not JSONL; regenerate it or fix that line.") from exc


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records from a JSONL, JSON-array or Parquet file."""
    path = existing_path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise UserError(f"{path} could not be read as Parquet ({exc}).") from exc
    if suffix == ".json":
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            return list(iter_jsonl(path))
        if isinstance(data, dict):
            return [data]
        if not isinstance(data, list):
            raise UserError(f"{path} holds JSON that is neither an object nor an array of records.")
        return data
    if suffix == ".jsonl":
        return list(iter_jsonl(path))
    raise UserError(f"{path} has an unknown format '{suffix}'. Give a .jsonl, .json or .parquet file.")


def find_files(inputs: Iterable[Path], suffixes: tuple[str, ...], what: str) -> list[tuple[Path, Path]]:
    """Expand files and folders (recursively) into `(file, root)` pairs, sorted and de-duplicated.

    `root` is the folder a file was found under (its own parent for a file given directly),
    so callers can mirror the input layout in their output.
    """
    found: dict[Path, Path] = {}
    for raw in inputs:
        p = existing_path(raw, what)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith("."):
                    found.setdefault(f.resolve(), p.resolve())
        else:
            found.setdefault(p.resolve(), p.resolve().parent)
    return sorted(found.items())


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block succeeds.

    Refuses a non-empty existing `path` unless `overwrite`; on failure nothing is left behind.
    """
    path = Path(path)
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"The output folder '{path}' already holds results. Choose another "
                        "folder with -o, or pass --overwrite to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)
