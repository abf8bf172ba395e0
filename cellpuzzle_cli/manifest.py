"""The artifact ledger: which command made which file, from what, with which settings.

Modelled on DVC's lock file. One JSON document (default `./cellpuzzle.json`):

    {"schema": 1, "entries": [{"id", "command", "argv", "params", "inputs", "outputs",
                               "versions", "started", "finished", "duration_s"}, ...]}

Inputs and outputs are `{"name", "path", "sha256", "size", "nfiles"}` with `path` relative
to the manifest's folder. Several processes (e.g. `predict` shards) may append at once, so
every update is read-modify-write under a file lock, written atomically.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli import __version__
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import write_json

SCHEMA = 1
DEFAULT_PATH = Path("cellpuzzle.json")
LOCK_TIMEOUT_S = 60
_VERSIONED = ("numpy", "anndata", "scanpy", "pyarrow", "torch", "transformers", "peft", "trl",
              "verl", "vllm", "ray")


@dataclass(frozen=True)
class Artifact:
    """A file or folder a run read or wrote; `name` tells roles apart (e.g. train vs test)."""

    path: Path
    name: str = "output"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


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


def library_versions() -> dict[str, str]:
    """Versions of the libraries already imported by this run (importing more would be slow)."""
    from importlib import metadata

    versions = {"cellpuzzle": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        if name in sys.modules:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                pass
    return versions


class Manifest:
    """Read and append entries of one manifest file."""

    def __init__(self, path: Path | str = DEFAULT_PATH):
        self.path = Path(path)
        self.root = self.path.resolve().parent
        # Inputs are only read, so one process hashes each once (e.g. a model shared by Ray shards).
        self._inputs: dict[Path, dict[str, Any]] = {}

    # -- reading -------------------------------------------------------------------------
    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"schema": SCHEMA, "entries": []}
        try:
            data = orjson.loads(self.path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise UserError(f"The manifest {self.path} is not valid JSON ({exc}). Restore it from "
                            "version control, or point --manifest at a new file.") from exc
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise UserError(f"{self.path} is not a cellpuzzle manifest (schema {SCHEMA}). Point "
                            "--manifest at another file.")
        return data

    def entries(self) -> list[dict[str, Any]]:
        return self.load()["entries"]

    def resolve(self, rel: str) -> Path:
        return (self.root / rel).resolve()

    def relative(self, path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), self.root).replace(os.sep, "/")

    def _newest(self, commands: str | Iterable[str]) -> Iterator[dict[str, Any]]:
        """Entries made by one of `commands`, newest first."""
        wanted = {commands} if isinstance(commands, str) else set(commands)
        return (e for e in reversed(self.entries()) if e["command"] in wanted)

    def latest(self, commands: str | Iterable[str]) -> dict[str, Any] | None:
        """The newest entry made by one of `commands`."""
        return next(self._newest(commands), None)

    def latest_output(self, commands: str | Iterable[str], name: str | None = None) -> Path | None:
        """Path of the newest output (named `name`, if given) of one of `commands`."""
        for entry in self._newest(commands):
            for out in entry["outputs"]:
                if name is None or out["name"] == name:
                    return self.resolve(out["path"])
        return None

    def latest_inputs(self, command: str, name: str) -> list[Path]:
        """Every input named `name` of the newest `command` entry (e.g. build-context's h5ad)."""
        for entry in self._newest(command):
            return [self.resolve(i["path"]) for i in entry.get("inputs", []) if i["name"] == name]
        return []

    def find_sibling_output(self, path: Path, name: str) -> Path | None:
        """The output called `name` of the entry that also wrote `path` (e.g. train beside test)."""
        target = self.relative(path)
        for entry in reversed(self.entries()):
            paths = {o["path"] for o in entry["outputs"]}
            if target in paths:
                for out in entry["outputs"]:
                    if out["name"] == name:
                        return self.resolve(out["path"])
        return None

    # -- writing -------------------------------------------------------------------------
    def _artifact(self, art: Artifact) -> dict[str, Any]:
        return {"name": art.name, "path": self.relative(art.path), **describe(art.path)}

    def _input(self, art: Artifact) -> dict[str, Any]:
        key = Path(art.path).resolve()
        if key not in self._inputs:
            self._inputs[key] = describe(art.path)
        return {"name": art.name, "path": self.relative(art.path), **self._inputs[key]}

    def record(self, command: str, params: dict[str, Any], inputs: Iterable[Artifact],
               outputs: Iterable[Artifact], started: float, argv: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append one run (`started` is a `time.time()`); hashing happens outside the lock."""
        import time

        from filelock import FileLock, Timeout

        finished = time.time()
        entry = {
            "id": uuid.uuid4().hex[:12],
            "command": command,
            "argv": list(sys.argv if argv is None else argv),
            "params": params,
            "inputs": [self._input(a) for a in inputs],
            "outputs": [self._artifact(a) for a in outputs],
            "versions": library_versions(),
            "started": iso(started),
            "finished": iso(finished),
            "duration_s": round(finished - started, 3),
        }
        if extra:
            entry.update(extra)
        lock = FileLock(str(self.path) + ".lock")
        try:
            with lock.acquire(timeout=LOCK_TIMEOUT_S):
                data = self.load()
                data["entries"].append(entry)
                write_json(self.path, data)
        except Timeout as exc:
            raise UserError(f"Another cellpuzzle process has held the manifest lock "
                            f"{self.path}.lock for {LOCK_TIMEOUT_S}s. If none is running, delete "
                            "that lock file.") from exc
        return entry
