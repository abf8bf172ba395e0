"""The artifact ledger: which command made which file, from what, with which settings.

Modelled on DVC's lock file. One JSON document (default `./cellpuzzle.json`):

    {"schema": 1, "entries": [{"id", "command", "argv", "params", "inputs", "outputs",
                               "versions", "started", "finished", "duration_s", ...}, ...]}

Inputs and outputs are `{"name", "path", "sha256", "size", "nfiles"}` with `path` relative
to the manifest's folder; outputs also say what they are (`kind`). The schema is checked on
every read, and this module alone reads entries: callers ask questions named after what they
need (`latest_output(Kind.MODEL)`, `base_model_of(adapter)`, `find(...)`). The ledger knows no
step: which command writes which kind is the step table's business (`steps.py`), and entries
written before outputs carried their kind are read with its `kind_of`. Several processes (e.g.
`predict` shards) may append at once, so every update is read-modify-write under a file lock,
written atomically.
"""

from __future__ import annotations

import os
import platform
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli import __version__
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import describe, write_json

SCHEMA = 1
DEFAULT_PATH = Path("cellpuzzle.json")
LOCK_TIMEOUT_S = 60
_VERSIONED = ("numpy", "anndata", "scanpy", "pyarrow", "torch", "transformers", "peft", "trl",
              "verl", "vllm", "ray")


class Kind(str, Enum):
    """What an artifact is, whichever command made it."""

    CELLS = "cells"
    PUZZLES = "puzzles"
    TRAIN_PUZZLES = "train puzzles"
    TEST_PUZZLES = "test puzzles"
    MODEL = "model"
    ADAPTER = "adapter"
    RL_TRAIN = "rl train data"
    RL_VAL = "rl validation data"
    CHECKPOINTS = "checkpoints"
    PREDICTIONS = "predictions"
    REPORT = "report"
    PLOT = "plot"
    ANNOTATIONS = "annotations"



@dataclass(frozen=True)
class Artifact:
    """A file or folder a run read or wrote; `name` tells roles apart (e.g. train vs test)."""

    path: Path
    name: str = "output"
    kind: Kind | None = None  # outputs: what the artifact is (inputs need not say)


@dataclass
class RunRecord:
    """A service's half of a manifest entry: settings, what it read and what it wrote."""

    params: dict[str, Any]
    inputs: list[Artifact]
    outputs: list[Artifact]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recorded:
    """An input or output as the ledger holds it (`path` relative to the manifest)."""

    name: str
    path: str
    sha256: str | None
    size: int
    nfiles: int
    kind: str | None = None


_ENTRY_FIELDS = {"id": str, "command": str, "params": dict, "inputs": list, "outputs": list,
                 "started": str, "finished": str, "duration_s": (int, float)}
_ARTIFACT_FIELDS = {"name": str, "path": str}


@dataclass(frozen=True)
class Entry:
    """One recorded run."""

    id: str
    command: str
    params: dict[str, Any]
    inputs: tuple[Recorded, ...]
    outputs: tuple[Recorded, ...]
    started: str
    finished: str
    duration_s: float
    argv: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # summary, results, …

    def output(self, name: str) -> Recorded | None:
        return next((o for o in self.outputs if o.name == name), None)

    def input(self, name: str) -> Recorded | None:
        return next((i for i in self.inputs if i.name == name), None)

    def outputs_of(self, kind: Kind) -> list[Recorded]:
        return [o for o in self.outputs if o.kind == kind.value]

    def to_dict(self) -> dict[str, Any]:
        def art(a: Recorded) -> dict[str, Any]:
            kind = {"kind": a.kind} if a.kind else {}
            return {"name": a.name, "path": a.path, "sha256": a.sha256, "size": a.size,
                    "nfiles": a.nfiles, **kind}

        return {"id": self.id, "command": self.command, "argv": list(self.argv),
                "params": self.params, "inputs": [art(a) for a in self.inputs],
                "outputs": [art(a) for a in self.outputs], "versions": self.versions,
                "started": self.started, "finished": self.finished,
                "duration_s": self.duration_s, **self.extra}


def _malformed(path: Path, detail: str) -> UserError:
    return UserError(f"The manifest {path} is malformed: {detail}. Restore it from version "
                     "control or a backup, or point --manifest at a new file.")


def _recorded(raw: Any, path: Path, where: str) -> Recorded:
    if not isinstance(raw, dict):
        raise _malformed(path, f"{where} is not an object")
    for key, kind in _ARTIFACT_FIELDS.items():
        if not isinstance(raw.get(key), kind):
            raise _malformed(path, f"{where} lacks a text '{key}'")
    kind = raw.get("kind")
    return Recorded(raw["name"], raw["path"], raw.get("sha256"), int(raw.get("size") or 0),
                    int(raw.get("nfiles") or 0), kind if isinstance(kind, str) else None)


def parse_entry(raw: Any, path: Path, index: int) -> Entry:
    """One entry dict checked against the schema (a clear error names what is wrong)."""
    where = f"entry {index + 1}"
    if not isinstance(raw, dict):
        raise _malformed(path, f"{where} is not an object")
    for key, kind in _ENTRY_FIELDS.items():
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise _malformed(path, f"{where} lacks '{key}' (or it has the wrong type)")
    known = {*_ENTRY_FIELDS, "argv", "versions"}
    return Entry(
        id=raw["id"], command=raw["command"], params=raw["params"],
        inputs=tuple(_recorded(a, path, f"{where}, input {i + 1}")
                     for i, a in enumerate(raw["inputs"])),
        outputs=tuple(_recorded(a, path, f"{where}, output {i + 1}")
                      for i, a in enumerate(raw["outputs"])),
        started=raw["started"], finished=raw["finished"], duration_s=float(raw["duration_s"]),
        argv=tuple(str(a) for a in raw.get("argv") or ()),
        versions=dict(raw.get("versions") or {}),
        extra={k: v for k, v in raw.items() if k not in known})


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


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


def jsonable(value: Any) -> Any:
    """Params as JSON values: paths become text, tuples lists, keys strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


@dataclass(frozen=True)
class Resolved:
    """An input path, and whether it came from the ledger (the caller may want to say so)."""

    path: Path
    from_manifest: bool

    def note(self, what: str) -> str | None:
        return f"Using {what} from the manifest: {self.path}" if self.from_manifest else None


class Manifest:
    """Read and append entries of one manifest file."""

    def __init__(self, path: Path | str = DEFAULT_PATH,
                 kind_of: Callable[[str, str], Kind | None] | None = None):
        self.path = Path(path)
        self.root = self.path.resolve().parent
        self._kind_of = kind_of  # for entries written before outputs carried their kind
        # Inputs are only read, so one process hashes each once (e.g. a model shared by Ray shards).
        self._inputs: dict[Path, dict[str, Any]] = {}

    # -- reading -------------------------------------------------------------------------
    def _load(self) -> list[Any]:
        """The raw entry list, after checking the document's outer shape."""
        if self.path.is_dir():
            raise UserError(f"The manifest path {self.path} is a folder. Point --manifest at a "
                            "JSON file (it is created on first use).")
        if not self.path.exists():
            return []
        try:
            data = orjson.loads(self.path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise UserError(f"The manifest {self.path} is not valid JSON ({exc}). Restore it from "
                            "version control, or point --manifest at a new file.") from exc
        schema = data.get("schema") if isinstance(data, dict) else None
        if isinstance(schema, int) and not isinstance(schema, bool) and schema > SCHEMA \
                and isinstance(data.get("entries"), list):
            raise UserError(f"The manifest {self.path} was written by a newer cellpuzzle (schema "
                            f"{schema}; this version, {__version__}, reads schema {SCHEMA}), so "
                            "its entries cannot be read safely. Upgrade cellpuzzle, or point "
                            "--manifest at another file.")
        if not isinstance(data, dict) or schema != SCHEMA:
            raise UserError(f"{self.path} is not a cellpuzzle manifest (schema {SCHEMA}). Point "
                            "--manifest at another file.")
        if not isinstance(data.get("entries"), list):
            raise _malformed(self.path, "it has no 'entries' list")
        return data["entries"]

    def entries(self) -> list[Entry]:
        return [self._with_kinds(parse_entry(raw, self.path, i))
                for i, raw in enumerate(self._load())]

    def _with_kinds(self, entry: Entry) -> Entry:
        if self._kind_of is None or all(o.kind for o in entry.outputs):
            return entry
        outputs = []
        for o in entry.outputs:
            kind = o.kind or self._kind_of(entry.command, o.name)
            outputs.append(replace(o, kind=kind.value if isinstance(kind, Kind) else kind))
        return replace(entry, outputs=tuple(outputs))

    def check(self) -> None:
        """Fail now, before any work, if the ledger cannot be read or appended to."""
        self.entries()
        import tempfile

        lock = Path(str(self.path) + ".lock")
        try:   # what record() will do: a file beside the manifest, the lock, the manifest
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path.parent):
                pass
            for existing in (p for p in (lock, self.path) if p.exists()):
                with open(existing, "r+b"):
                    pass
        except OSError as exc:
            raise UserError(f"The manifest {self.path} cannot be written ({exc.strerror}: "
                            f"{exc.filename}), so this run could not be recorded; nothing was "
                            "done. Make it writable, or point --manifest at a file in a folder "
                            "you may write to.") from exc

    def find(self, matches: Callable[[Entry], bool]) -> Entry | None:
        """The newest entry for which `matches` holds."""
        return next((e for e in self._newest() if matches(e)), None)

    def entries_of(self, command: str) -> list[Entry]:
        """Every entry `command` made, oldest first."""
        return [e for e in self.entries() if e.command == command]

    def resolve(self, rel: str) -> Path:
        return (self.root / rel).resolve()

    def relative(self, path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), self.root).replace(os.sep, "/")

    def _newest(self, commands: Iterable[str] | None = None) -> Iterator[Entry]:
        wanted = None if commands is None else set(commands)
        return (e for e in reversed(self.entries()) if wanted is None or e.command in wanted)

    def latest(self, command: str) -> Entry | None:
        """The newest entry made by `command`."""
        return next(self._newest([command]), None)

    def latest_output(self, kind: Kind) -> Path | None:
        """Path of the newest recorded artifact of `kind`, whichever command made it."""
        for entry in self._newest():
            outs = entry.outputs_of(kind)
            if outs:
                return self.resolve(outs[0].path)
        return None

    def sources_of_latest(self, kind: Kind) -> list[Path]:
        """The inputs of the run that made the newest artifact of `kind` (e.g. the .h5ad files
        behind the latest cells, which predict's CellTypist reference reads expression from)."""
        entry = next((e for e in self._newest() if e.outputs_of(kind)), None)
        return [self.resolve(i.path) for i in entry.inputs] if entry else []

    def producer_of(self, path: Path) -> Entry | None:
        """The newest entry that wrote `path`."""
        target = self.relative(path)
        return next((e for e in self._newest() if any(o.path == target for o in e.outputs)),
                    None)

    def last_seen(self, path: Path) -> tuple[Entry, Recorded] | None:
        """For a path some run wrote: its newest record (as that run's output, or as a later
        run's input) with the entry holding it, the content the ledger last vouched for. None
        for a path no run wrote (the user's own data)."""
        target = self.relative(path)
        newest = None
        for entry in self._newest():
            if newest is None:
                newest = next(((entry, a) for a in entry.inputs if a.path == target), None)
            made = next((a for a in entry.outputs if a.path == target), None)
            if made is not None:
                return newest or (entry, made)
        return None

    def upstream(self, path: Path, kind: Kind, depth: int = 8) -> Path | None:
        """The nearest recorded artifact of `kind` that `path` was made from, following each
        run's inputs back (e.g. the training puzzles behind a model that sft, merge-lora and
        rl made in turn)."""
        frontier, seen = [Path(path)], set()
        for _ in range(depth):
            following = []
            for item in frontier:
                entry = self.producer_of(item)
                if entry is None or entry.id in seen:
                    continue
                seen.add(entry.id)
                for recorded in entry.inputs:
                    source = self.resolve(recorded.path)
                    made = self.producer_of(source)
                    out = made.output(next((o.name for o in made.outputs
                                            if o.path == recorded.path), "")) if made else None
                    if out is not None and out.kind == kind.value:
                        return source
                    following.append(source)
            frontier = following
        return None

    def sibling_output(self, path: Path, kind: Kind) -> Path | None:
        """The `kind` output of the run that also wrote `path` (e.g. train beside test)."""
        entry = self.producer_of(path)
        outs = entry.outputs_of(kind) if entry else []
        return self.resolve(outs[0].path) if outs else None

    def base_model_of(self, adapter: Path) -> Path | None:
        """The base model the recorded run that wrote `adapter` trained on."""
        entry = self.producer_of(adapter)
        base = entry.input("base_model") if entry else None
        return self.resolve(base.path) if base else None

    def input_or_latest(self, given: Path | None, kind: Kind, what: str,
                        made_by: Sequence[str] = ()) -> Resolved:
        """The user's input, else the newest recorded artifact of `kind` (which must exist);
        `made_by` names the commands that make such artifacts, for the message."""
        if given is not None:
            return Resolved(Path(given), False)
        found = self.latest_output(kind)
        steps = " or ".join(f"`{c}`" for c in made_by) or f"step that makes {kind.value}"
        if found is None:
            raise UserError(f"No {what} given and the manifest {self.path} records no {steps} "
                            f"run to take it from. Pass the {what} explicitly, or run "
                            f"{steps} first.")
        if not found.exists():
            raise UserError(f"The manifest {self.path} points to {found} for the {what}, but it "
                            "no longer exists. Pass the input explicitly or re-run the step that "
                            "made it.")
        return Resolved(found, True)

    # -- writing -------------------------------------------------------------------------
    def _artifact(self, art: Artifact) -> dict[str, Any]:
        kind = {"kind": art.kind.value} if art.kind else {}
        return {"name": art.name, "path": self.relative(art.path), **describe(art.path), **kind}

    def _input(self, art: Artifact) -> dict[str, Any]:
        key = Path(art.path).resolve()
        if key not in self._inputs:
            self._inputs[key] = describe(art.path)
        return {"name": art.name, "path": self.relative(art.path), **self._inputs[key]}

    def input_hash(self, art: Artifact) -> str | None:
        """An input's content hash, computed once per process."""
        return self._input(art)["sha256"]

    def record(self, command: str, params: dict[str, Any], inputs: Iterable[Artifact],
               outputs: Iterable[Artifact], started: float, argv: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> Entry:
        """Append one run (`started` is a `time.time()`); hashing happens outside the lock."""
        import time

        from filelock import FileLock, Timeout

        outputs = list(outputs)
        finished = time.time()
        entry = {
            "id": uuid.uuid4().hex[:12],
            "command": command,
            "argv": list(sys.argv if argv is None else argv),
            "params": jsonable(params),
            "inputs": [self._input(a) for a in inputs],
            "outputs": [self._artifact(a) for a in outputs],
            "versions": library_versions(),
            "started": iso(started),
            "finished": iso(finished),
            "duration_s": round(finished - started, 3),
            **jsonable(extra or {}),
        }
        lock = FileLock(str(self.path) + ".lock")
        try:
            with lock.acquire(timeout=LOCK_TIMEOUT_S):
                entries = self._load()
                write_json(self.path, {"schema": SCHEMA, "entries": [*entries, entry]})
        except Timeout as exc:
            raise UserError(f"Another cellpuzzle process has held the manifest lock "
                            f"{self.path}.lock for {LOCK_TIMEOUT_S}s. If none is running, delete "
                            "that lock file.") from exc
        return parse_entry(entry, self.path, 0)
