"""One runner for every step: settings, inputs, the up-to-date stamp, the work, the record.

A command module parses its options into a `Request` and calls `run`; the step's spec
(`steps.STEPS`) says the rest. In order:

1. the ledger is checked (readable and writable) before any work;
2. settings are layered, one way for every step (`config.layer_settings`): the dataclass
   defaults < `--config` YAML (else the shipped file) < `key=value` overrides < options;
3. inputs left out come from the ledger (the newest artifact of the input's kind);
4. the step's own `plan` resolves what the generic rules cannot;
5. a folder-writing step whose folder already holds this very run (same command, settings and
   input hashes, recorded unchanged) is `up to date` and skipped; one whose run was killed
   between publishing and recording is recorded now (`recovered`);
6. the service runs, its output folder carrying the run's stamp as it is published;
7. the run is recorded, here and nowhere else.

It returns an `Outcome` (state, outputs, notes, warnings, the service's result and summary);
the CLI prints it, as text or as one JSON object.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cellpuzzle_cli.config import layer_settings, settings_dict
from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, describe, spare_inputs
from cellpuzzle_cli.manifest import Artifact, Manifest, RunRecord, jsonable
from cellpuzzle_cli.steps import STEPS, In, StepSpec, from_ledger

STAMP_FILE = ".cellpuzzle-run.json"  # a step's identity, inside the folder it published
ProgressFactory = Callable[..., AbstractContextManager[Progress]]  # (label, unit=...) -> update


@dataclass
class Request:
    """What the user asked for; an input left out (None) comes from the ledger."""

    command: str
    inputs: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # settings given as options
    overrides: list[str] = field(default_factory=list)     # key=value
    config: Path | None = None
    overwrite: bool = False
    flags: dict[str, Any] = field(default_factory=dict)    # options that are not settings


@dataclass
class Job:
    """One resolved run, as the step's plan and service see it."""

    command: str
    settings: Any
    inputs: dict[str, Any]
    output: Path | None
    overwrite: bool
    flags: dict[str, Any]
    ledger: Manifest
    params: dict[str, Any]         # recorded with the run (settings and inputs)
    artifacts: list[Artifact]      # the inputs as recorded
    notes: list[str] = field(default_factory=list)
    config: Path | None = None     # the --config file and key=value overrides as given (rl
    overrides: list[str] = field(default_factory=list)  # tells what the user set explicitly)

    def flag(self, name: str, default: Any = None) -> Any:
        value = self.flags.get(name)
        return default if value is None else value


@dataclass
class Outcome:
    """What a run did, for the CLI to print."""

    command: str
    state: str                      # done, up to date, recovered, dry run, launched
    outputs: dict[str, str] = field(default_factory=dict)
    result: Any = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    exit_code: int = 0
    main: bool = True               # False in torchrun's other processes: they say nothing
    error: Exception | None = None  # raised once the outcome is shown (e.g. a failed Ray shard)
    folder: str | None = None       # the output folder a skipped step found complete

    def to_json(self) -> dict[str, Any]:
        return jsonable({"command": self.command, "state": self.state, "outputs": self.outputs,
                         "summary": self.summary, "notes": self.notes,
                         "warnings": self.warnings, "exit_code": self.exit_code,
                         "timings": {"seconds": round(self.seconds, 3)}})


def run(request: Request, ledger: Manifest, progress: ProgressFactory | None = None) -> Outcome:
    """Run one step (see the module docstring)."""
    from cellpuzzle_cli.distributed import is_main_process

    started = time.time()
    spec = STEPS[request.command]
    ledger.check()
    job = _job(spec, request, ledger)
    launch = spec.function("launch")
    if launch is not None and (code := launch(job)) is not None:
        return Outcome(spec.name, "launched", exit_code=code, seconds=time.time() - started)
    _resolve_inputs(spec, job, request)
    plan = spec.function("plan")
    if plan is not None:
        plan(job)
    spare_inputs([("-o", job.output)] + [(f"--{o.flag}", job.flags.get(o.flag))
                                         for o in spec.outputs if o.flag],
                 [a.path for a in job.artifacts])
    _check_unchanged(job)
    # a stamped step writes its spec's outputs under -o; the others say what they wrote
    outputs = [Artifact(o.path(job.output), o.name, o.kind) for o in spec.outputs] \
        if spec.stamped else []
    stamp = Stamp(ledger, spec.name, job.params, job.artifacts, outputs, job.output) \
        if spec.stamped else None
    fresh = stamp is None or job.overwrite or job.flag("resume", False)
    if not is_main_process():
        if fresh or stamp.state() == "new":
            spec.function("step")(job, lambda *a, **k: None)
        return Outcome(spec.name, "done", main=False)
    state = "new" if fresh else stamp.state()
    if state in ("up to date", "unrecorded"):
        if state == "unrecorded":
            _record(job, spec, RunRecord(stamp.params, job.artifacts, outputs, {"recovered": True}),
                    time.time(), stamp)
        return Outcome(spec.name, "recovered" if state == "unrecorded" else state,
                       _paths(outputs), notes=job.notes, folder=str(job.output))
    with _publishing(stamp), _progress(progress, spec) as update:
        result = spec.function("step")(job, update)
    return _finish(spec, job, result, outputs, stamp, started)


def _job(spec: StepSpec, request: Request, ledger: Manifest) -> Job:
    settings = layer_settings(spec.settings_class(), request.config, request.overrides,
                              request.options, shipped=spec.shipped, load=spec.function("load"))
    params = settings_dict(settings) if hasattr(settings, "__dataclass_fields__") else {}
    return Job(spec.name, settings, {}, request.output, request.overwrite, dict(request.flags),
               ledger, params, [], config=request.config, overrides=list(request.overrides))


def _resolve_inputs(spec: StepSpec, job: Job, request: Request) -> None:
    """Given inputs as they are; the others of an `auto` role from the ledger (said in a note)."""
    for role in spec.inputs:
        value = request.inputs.get(role.name)
        if value is None and role.auto and role.kind is not None:
            resolved = from_ledger(job.ledger, None, role.kind, role.label)
            job.notes.append(resolved.note(role.label))
            value = resolved.path
        set_input(job, role, value)


def _check_unchanged(job: Job) -> None:
    """An input the ledger recorded must still hold what it recorded: a file edited or replaced
    since would make outputs the manifest misdescribes. `--allow-changed` takes it as it is
    (this run records its new hash, which later runs then accept)."""
    for art in job.artifacts:
        seen = job.ledger.last_seen(art.path)
        if seen is None or seen[1].sha256 is None:
            continue
        entry, recorded = seen
        now = job.ledger.input_hash(art)
        if now == recorded.sha256:
            continue
        what = f"{art.path} changed since the manifest recorded it (`{entry.command}`, " \
               f"{entry.finished[:19].replace('T', ' ')}: sha256 {recorded.sha256[:12]}…, now " \
               f"{(now or 'missing')[:12]}…)"
        if not job.flag("allow_changed", False):
            raise UserError(f"{what}. Outputs made from it would not be what the manifest says "
                            f"they came from. Re-run `{entry.command}` to make it again, or pass "
                            "--allow-changed (cellpuzzle --allow-changed COMMAND …) to use it as "
                            "it is; its new hash is then recorded.")
        job.notes.append(f"{what}; used as it is (--allow-changed).")


def set_input(job: Job, role: In, value: Any) -> None:
    """Put an input into the job: its value, its recorded param, its artifact(s)."""
    job.inputs[role.name] = value
    if value is None:
        return
    job.params[role.key] = value
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if Path(str(item)).exists():  # not a hub id; a missing file is the service's to refuse
            job.artifacts.append(Artifact(Path(item), role.name))


def _finish(spec: StepSpec, job: Job, result: Any, outputs: list[Artifact],
            stamp: Stamp | None, started: float) -> Outcome:
    """Record the run(s) the service made and say what happened."""
    summary = getattr(result, "summary", None)
    summary = summary() if callable(summary) else dict(summary or {})
    warnings = list(getattr(result, "warnings", None) or [])
    notes = job.notes + list(getattr(result, "notes", None) or [])
    if getattr(result, "dry_run", False):
        return Outcome(spec.name, "dry run", result=result, notes=notes, warnings=warnings,
                       summary=summary, seconds=time.time() - started)
    records = getattr(result, "records", None)
    if records is None:
        extra = {"summary": summary} if summary else {}
        records = [RunRecord(job.params, job.artifacts, outputs, extra)]
    written: dict[str, str] = {}
    for record in records:
        _record(job, spec, record, started, stamp)
        written.update(_paths(record.outputs))
    failure = getattr(result, "failure", None)
    return Outcome(spec.name, "done", written, result, notes, warnings, summary,
                   time.time() - started, getattr(result, "exit_code", 0),
                   error=failure() if callable(failure) else None)


def _record(job: Job, spec: StepSpec, record: RunRecord, started: float,
            stamp: Stamp | None) -> None:
    """The one place a run enters the ledger (with its stamp's key, so a rerun knows it)."""
    key = {"key": stamp.key} if stamp is not None else {}
    job.ledger.record(spec.name, record.params, record.inputs, record.outputs, started,
                      extra={**key, **record.extra})


def _paths(artifacts: list[Artifact]) -> dict[str, str]:
    return {a.name: str(a.path) for a in artifacts}


@contextlib.contextmanager
def _progress(factory: ProgressFactory | None, spec: StepSpec) -> Iterator[Progress]:
    if factory is None:
        yield lambda *a, **k: None
        return
    quiet_libraries()
    with factory(spec.label or spec.name, unit=spec.unit) as update:
        yield update


# Read by the Hugging Face libraries when they are imported; a user's own setting wins.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error"}


def quiet_libraries() -> None:
    """One progress display per command: the Hugging Face libraries' own bars (loading and
    writing weights, mapping datasets) and info logs are silenced while ours shows.

    Through their environment variables, so a library not imported yet (predict's baseline
    imports none) costs nothing and starts quiet, in this process and the ones it starts
    (torchrun, Ray, verl); the ones already imported are told directly."""
    import os
    import sys

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()


@contextlib.contextmanager
def _publishing(stamp: Stamp | None) -> Iterator[None]:
    if stamp is None:
        yield
        return
    with stamp.publishing():
        yield


class Stamp:
    """A folder-writing run's identity: command, settings and input hashes.

    Written into the output folder as it is published. Run again with the same settings on the
    same inputs, the step recognises that folder as its own: `up to date` when the ledger
    records it unchanged, or `unrecorded` when a kill struck between publishing and recording.
    Anything else is `new` work.
    """

    def __init__(self, ledger: Manifest, command: str, params: dict[str, Any],
                 inputs: list[Artifact], outputs: list[Artifact], folder: Path | None):
        self.ledger, self.command, self.folder = ledger, command, Path(folder or ".")
        self.params, self.outputs = jsonable(params), outputs
        identity = {"command": command, "params": self.params,
                    "inputs": sorted((a.name, ledger.input_hash(a)) for a in inputs)}
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
        wanted = {self.ledger.relative(a.path) for a in self.outputs}
        mine = self.ledger.find(lambda e: e.extra.get("key") == self.key
                                and {o.path for o in e.outputs} == wanted)
        if mine is None:
            return "unrecorded"
        unchanged = all(describe(self.ledger.resolve(o.path))["sha256"] == o.sha256
                        for o in mine.outputs)
        return "up to date" if unchanged else "new"
