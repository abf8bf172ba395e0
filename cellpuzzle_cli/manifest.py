"""The artifact ledger: which command made which file, from what, with which settings.

Modelled on DVC's lock file. One JSON document (default `./cellpuzzle.json`):

    {"schema": 1, "entries": [{"id", "command", "argv", "params", "inputs", "outputs",
                               "versions", "started", "finished", "duration_s", ...}, ...]}

Inputs and outputs are `{"name", "path", "sha256", "size", "nfiles"}` with `path` relative
to the manifest's folder. The schema is checked on every read, and this module alone reads
entries: callers ask questions named after what they need (`latest_output(Kind.MODEL)`,
`base_model_of(adapter)`, `predict_shards()`), and `PRODUCES` is the one registry of which
command writes which kind of artifact. Several processes (e.g. `predict` shards) may append
at once, so every update is read-modify-write under a file lock, written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli import __version__
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import write_json

SCHEMA = 1
DEFAULT_PATH = Path("cellpuzzle.json")
STAMP_FILE = ".cellpuzzle-run.json"  # a step's identity, inside the folder it published
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


# command -> {output name -> kind}: what each step writes. A model is a model whichever step
# made it, so `predict`, `sft` and `rl` all take the newest one by default.
PRODUCES: dict[str, dict[str, Kind]] = {
    "build-context": {"cells": Kind.CELLS},
    "make-qa": {"puzzles": Kind.PUZZLES},
    "split": {"train": Kind.TRAIN_PUZZLES, "test": Kind.TEST_PUZZLES},
    "init-model": {"model": Kind.MODEL},
    "sft": {"adapter": Kind.ADAPTER, "model": Kind.MODEL},
    "merge-lora": {"model": Kind.MODEL},
    "to-parquet": {"train": Kind.RL_TRAIN, "val": Kind.RL_VAL},
    "rl grpo": {"model": Kind.MODEL, "checkpoints": Kind.CHECKPOINTS},
    "rl ppo": {"checkpoints": Kind.CHECKPOINTS},
    "convert-ckpt": {"model": Kind.MODEL},
    "predict": {"predictions": Kind.PREDICTIONS},
    "score": {"report": Kind.REPORT, "plot": Kind.PLOT},
}


def producers(kind: Kind) -> list[str]:
    """The commands that write artifacts of `kind` (for messages)."""
    return [command for command, outputs in PRODUCES.items() if kind in outputs.values()]


@dataclass(frozen=True)
class Artifact:
    """A file or folder a run read or wrote; `name` tells roles apart (e.g. train vs test)."""

    path: Path
    name: str = "output"


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
        names = PRODUCES.get(self.command, {})
        return [o for o in self.outputs if names.get(o.name) == kind]

    def to_dict(self) -> dict[str, Any]:
        def art(a: Recorded) -> dict[str, Any]:
            return {"name": a.name, "path": a.path, "sha256": a.sha256, "size": a.size,
                    "nfiles": a.nfiles}

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
    return Recorded(raw["name"], raw["path"], raw.get("sha256"), int(raw.get("size") or 0),
                    int(raw.get("nfiles") or 0))


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


@dataclass
class PredictShards:
    """The shard files of the latest `predict` run, and the shards with no finished entry."""

    output_dir: str
    num_shards: int
    files: list[Path]
    missing: list[int]


class Step:
    """One run of a folder-writing step, from its checks to its manifest entry.

    Its stamp (command, settings, input hashes) is written into the output folder as the folder
    is published (`publishing`). Run again with the same settings on the same inputs, the step
    recognises that folder as its own: `up to date` when the ledger records it unchanged, or
    `unrecorded` when a kill struck between publishing and recording (then it is recorded
    without redoing the work). Anything else is `new` work.
    """

    def __init__(self, manifest: Manifest, command: str, params: dict[str, Any],
                 inputs: list[Artifact], outputs: list[Artifact], folder: Path):
        self.manifest, self.command, self.folder = manifest, command, Path(folder)
        self.params, self.inputs, self.outputs = jsonable(params), inputs, outputs
        identity = {"command": command, "params": self.params,
                    "inputs": sorted((a.name, manifest.input_hash(a)) for a in inputs)}
        self.key = hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def stamp(self) -> bytes:
        return orjson.dumps({"key": self.key, "command": self.command}, option=orjson.OPT_INDENT_2)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[None]:
        """Folders published inside this block carry the stamp."""
        from cellpuzzle_cli.io import PUBLISH_EXTRAS

        token = PUBLISH_EXTRAS.set(((STAMP_FILE, self.stamp()),))
        try:
            yield
        finally:
            PUBLISH_EXTRAS.reset(token)

    def state(self) -> str:
        """`new`, `up to date` or `unrecorded` (see the class docstring)."""
        try:
            stamp = orjson.loads((self.folder / STAMP_FILE).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return "new"
        if not isinstance(stamp, dict) or stamp.get("key") != self.key:
            return "new"
        wanted = {self.manifest.relative(a.path) for a in self.outputs}
        mine = [e for e in self.manifest.entries() if e.extra.get("key") == self.key
                and {o.path for o in e.outputs} == wanted]
        if not mine:
            return "unrecorded"
        newest = {o.path: o.sha256 for o in mine[-1].outputs}
        unchanged = all(describe(self.manifest.resolve(rel))["sha256"] == sha
                        for rel, sha in newest.items())
        return "up to date" if unchanged else "new"

    def record(self, started: float, extra: dict[str, Any] | None = None) -> Entry:
        return self.manifest.record(self.command, self.params, self.inputs, self.outputs,
                                    started, extra={"key": self.key, **(extra or {})})


class Manifest:
    """Read and append entries of one manifest file."""

    def __init__(self, path: Path | str = DEFAULT_PATH):
        self.path = Path(path)
        self.root = self.path.resolve().parent
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
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise UserError(f"{self.path} is not a cellpuzzle manifest (schema {SCHEMA}). Point "
                            "--manifest at another file.")
        if not isinstance(data.get("entries"), list):
            raise _malformed(self.path, "it has no 'entries' list")
        return data["entries"]

    def entries(self) -> list[Entry]:
        return [parse_entry(raw, self.path, i) for i, raw in enumerate(self._load())]

    def check(self) -> None:
        """Fail now, before any work, if the ledger cannot be read or appended to."""
        self.entries()

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

    def input_or_latest(self, given: Path | None, kind: Kind, what: str) -> Resolved:
        """The user's input, else the newest recorded artifact of `kind` (which must exist)."""
        if given is not None:
            return Resolved(Path(given), False)
        found = self.latest_output(kind)
        steps = " or ".join(f"`{c}`" for c in producers(kind))
        if found is None:
            raise UserError(f"No {what} given and the manifest {self.path} records no {steps} "
                            f"run to take it from. Pass the {what} explicitly, or run "
                            f"{steps} first.")
        if not found.exists():
            raise UserError(f"The manifest {self.path} points to {found} for the {what}, but it "
                            "no longer exists. Pass the input explicitly or re-run the step that "
                            "made it.")
        return Resolved(found, True)

    def predict_shards(self) -> PredictShards:
        """Shard files of the latest `predict` run, and which shards have not completed."""
        from cellpuzzle_cli.predict.shards import shard_filename

        latest = self.latest("predict")
        if latest is None:
            raise UserError(f"No predictions given and the manifest {self.path} records no "
                            "`predict` run. Pass prediction files or folders, or run `cellpuzzle "
                            "predict` first.")
        output_dir = latest.params.get("output_dir")
        num_shards = int(latest.params.get("num_shards") or 1)
        if output_dir is None:
            raise UserError(f"The latest `predict` entry in {self.path} names no output_dir. Pass "
                            "the prediction folder explicitly.")
        names = {shard_filename(i, num_shards): i for i in range(num_shards)}
        found: dict[int, Path] = {}
        for entry in self.entries():
            p = entry.params
            if (entry.command != "predict" or not p.get("complete")
                    or p.get("output_dir") != output_dir
                    or int(p.get("num_shards") or 1) != num_shards):
                continue
            for out in entry.outputs_of(Kind.PREDICTIONS):
                i = names.get(Path(out.path).name)
                if i is not None and self.resolve(out.path).exists():
                    found[i] = self.resolve(out.path)
        missing = [i for i in range(num_shards) if i not in found]
        return PredictShards(str(output_dir), num_shards, [found[i] for i in sorted(found)],
                             missing)

    # -- writing -------------------------------------------------------------------------
    def _artifact(self, art: Artifact) -> dict[str, Any]:
        return {"name": art.name, "path": self.relative(art.path), **describe(art.path)}

    def _input(self, art: Artifact) -> dict[str, Any]:
        key = Path(art.path).resolve()
        if key not in self._inputs:
            self._inputs[key] = describe(art.path)
        return {"name": art.name, "path": self.relative(art.path), **self._inputs[key]}

    def input_hash(self, art: Artifact) -> str | None:
        """An input's content hash, computed once per process."""
        return self._input(art)["sha256"]

    def step(self, command: str, params: dict[str, Any], inputs: Iterable[Artifact],
             outputs: Iterable[Artifact], folder: Path) -> Step:
        """A run of `command` about to write `folder` (see `Step`)."""
        return Step(self, command, params, list(inputs), list(outputs), folder)

    def record(self, command: str, params: dict[str, Any], inputs: Iterable[Artifact],
               outputs: Iterable[Artifact], started: float, argv: list[str] | None = None,
               extra: dict[str, Any] | None = None) -> Entry:
        """Append one run (`started` is a `time.time()`); hashing happens outside the lock."""
        import time

        from filelock import FileLock, Timeout

        outputs = list(outputs)
        known = PRODUCES.get(command)
        unknown = [o.name for o in outputs if known is None or o.name not in known]
        if unknown:  # a programming error: the registry and the command disagree
            raise ValueError(f"{command} records outputs {unknown} that PRODUCES does not list")
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
