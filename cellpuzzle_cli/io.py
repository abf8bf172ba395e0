"""Reading and writing the project's file formats, always atomically.

Readers accept what users hold: JSONL, a JSON array (the original Cell-o1 scripts' files)
and Parquet (the published CellPuzzles dataset). Writers never leave a half-written file:
they write beside the target and rename.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli.errors import UserError, existing_path

_UMASK = os.umask(0)
os.umask(_UMASK)
# What services accept to report progress: `progress(advance, total=…, description=…)`. A call
# that gives `total` starts a phase: the bar restarts at `advance` of `total`.
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


def spare_inputs(outputs: Sequence[tuple[str, Path | None]], inputs: Iterable[Path]) -> None:
    """Refuse outputs that would replace what the run reads, or each other: an output that is
    an input, or a folder holding one, would be overwritten or deleted (an output folder is
    replaced whole when published with --overwrite). `outputs` are (option, path) pairs."""
    read = [Path(p).resolve() for p in inputs]
    taken: dict[Path, str] = {}
    for option, path in outputs:
        if path is None:
            continue
        out = Path(path).resolve()
        hit = next((i for i in read if i == out or out in i.parents), None)
        if hit is not None:
            raise UserError(f"{option} {path} {'is' if hit == out else 'holds'} an input of this "
                            f"run ({hit}); writing there would replace it. Give {option} "
                            "another path.")
        if out in taken:
            raise UserError(f"{taken[out]} and {option} both name {path}, so one would "
                            "overwrite the other. Give each its own path.")
        taken[out] = option


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


def iter_jsonl(path: Path, chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """JSONL values, parsed about `chunk_bytes` at a time by one orjson call each.

    JSON strings cannot hold a raw newline, so every newline separates records: turning the
    newlines of a block into commas makes it one JSON array. A block that then does not parse
    to one value per line (blank lines, bad JSON) is re-read line by line to name the bad line.
    """
    lineno = 0
    tail = b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk_bytes)
            block = tail + data
            if data:
                cut = block.rfind(b"\n")
                if cut < 0:
                    tail = block
                    continue
                block, tail = block[:cut], block[cut + 1:]
            else:
                tail = b""
            if not block.strip():
                lineno += block.count(b"\n") + (1 if data else 0)
                if not data:
                    return
                continue
            lines = block.count(b"\n") + 1
            try:
                values = orjson.loads(b"[" + block.replace(b"\n", b",") + b"]")
            except orjson.JSONDecodeError:
                values = None
            if values is None or len(values) != lines:
                values = _parse_lines(path, block.split(b"\n"), lineno)
            lineno += lines
            yield from values
            if not data:
                return


def _parse_lines(path: Path, lines: list[bytes], lineno: int) -> list[Any]:
    values = []
    for k, line in enumerate(lines, lineno + 1):
        if not line.strip():
            continue
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{path}, line {k} is not valid JSON ({exc}). The file may be "
                            "truncated or not JSONL; regenerate it or fix that line.") from exc
    return values


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records (JSON objects) from a JSONL, JSON-array or Parquet file."""
    path = existing_path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, but a .jsonl, .json or .parquet file is expected "
                        "there. Give the file's path.")
    records = _read_any(path)
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise UserError(f"Record {i} of {path} is a {type(rec).__name__}, not an object with "
                            "named fields. Give a file of records, such as the ones cellpuzzle "
                            "writes.")
    return records


def _read_any(path: Path) -> list[Any]:
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


def check_unique_ids(ids: Iterable[Any], path: Path, fix: str) -> None:
    """Every puzzle id once: splits, predictions and resumes are keyed by it."""
    from collections import Counter

    dupes = [pid for pid, count in Counter(ids).items() if count > 1]
    if dupes:
        raise UserError(f"{path} holds {len(dupes)} puzzle id(s) more than once (e.g. "
                        f"'{dupes[0]}'). {fix}")


def read_text(path: Path | str, what: str = "input file") -> str:
    """A UTF-8 text file the user named, with a clear error for folders and other encodings."""
    p = existing_path(path, what)
    if p.is_dir():
        raise UserError(f"The {what} '{p}' is a folder. Give the path of a file.")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"The {what} '{p}' is not UTF-8 text ({exc.reason} at byte {exc.start}). "
                        "Save it as UTF-8.") from exc


def find_files(inputs: Iterable[Path], suffixes: tuple[str, ...], what: str) -> list[tuple[Path, Path]]:
    """Expand files and folders (recursively) into `(file, root)` pairs, sorted and de-duplicated.

    `root` is the folder a file was found under (its own parent for a file given directly),
    so callers can mirror the input layout in their output. Symlinked files and folders are
    followed but keep the names they have under `root`, so outputs mirror the links.
    """
    found: dict[Path, tuple[Path, Path]] = {}
    for raw in inputs:
        p = existing_path(raw, what)
        named = Path(os.path.abspath(p))
        if p.is_dir():
            for f in _walk(named):
                if f.suffix.lower() in suffixes and not f.name.startswith("."):
                    found.setdefault(f.resolve(), (f, named))
        else:
            found.setdefault(p.resolve(), (named, named.parent))
    return sorted(found.values())


def _walk(root: Path) -> list[Path]:
    """Files below `root`, following symlinked folders once each (no loops)."""
    seen: set[str] = set()
    files: list[Path] = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        files.extend(Path(folder) / n for n in sorted(names) if os.path.isfile(Path(folder) / n))
    return files


# Files every folder published in this context also gets (the manifest's run stamp: see
# manifest.Step). Set by the command that runs the step; services need not know about it.
PUBLISH_EXTRAS: contextvars.ContextVar[tuple[tuple[str, bytes], ...]] = contextvars.ContextVar(
    "publish_extras", default=())
_PARTIAL = ".partial"


def _partial_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_partials(path: Path) -> list[Path]:
    """Delete half-written siblings of `path` left by killed runs (their process is gone)."""
    removed = []
    prefix = _partial_prefix(path)
    for sibling in path.parent.glob(f"{glob_escape(prefix)}*{_PARTIAL}"):
        pid = sibling.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` only if the block succeeds.

    Refuses a non-empty existing `path` unless `overwrite`; on failure nothing is left behind,
    and half-written folders of killed runs for the same `path` are removed first.
    """
    path = Path(path)
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"The output folder '{path}' already holds results. Choose another "
                        "folder with -o, or pass --overwrite to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(path)}{os.getpid()}.",
                                    suffix=_PARTIAL, dir=path.parent))
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        raise UserError(f"The output name '{path.name}' is longer than the file system allows "
                        "(it needs room for a temporary name beside it). Choose a shorter -o "
                        "name.") from exc
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        for name, data in PUBLISH_EXTRAS.get():
            atomic_write_bytes(tmp / name, data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


# -- content hashes (the ledger records them) ----------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(path: Path) -> dict[str, Any]:
    """Content hash, size and file count; a folder's hash covers relative paths and contents."""
    path = Path(path)
    if path.is_file():
        return {"sha256": file_sha256(path), "size": path.stat().st_size, "nfiles": 1}
    if not path.is_dir():
        return {"sha256": None, "size": 0, "nfiles": 0}
    h = hashlib.sha256()
    size = nfiles = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0" + file_sha256(f).encode() + b"\n")
        size += f.stat().st_size
        nfiles += 1
    return {"sha256": h.hexdigest(), "size": size, "nfiles": nfiles}
