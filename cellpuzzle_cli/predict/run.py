"""predict as a pipeline step: resolve every default once, run, say what to record.

The runner has layered the settings and found the test data. Here the backend is chosen, the
training data (baseline, celltypist) and model come from the manifest when not given
(Cell-o1's `../train/train_data.json` beside a `test/` file counts as given), the output
folder is named, and one shard runs here (or all of them as Ray tasks). Each finished shard
becomes one manifest entry, as if it had been launched by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, labelled
from cellpuzzle_cli.manifest import Artifact, Kind, Manifest, RunRecord
from cellpuzzle_cli.predict.backends import resolve_backend
from cellpuzzle_cli.predict.records import cello1_train_file
from cellpuzzle_cli.predict.settings import TRAINED_BACKENDS, PredictJob
from cellpuzzle_cli.predict.shard_run import PredictResult, run_predict
from cellpuzzle_cli.predict.shards import Shard
from cellpuzzle_cli.steps import from_ledger

if TYPE_CHECKING:
    from cellpuzzle_cli.runner import Job


@dataclass
class PredictRun:
    """The finished shards, the failed ones (Ray), notes for the user and manifest entries."""

    results: list[PredictResult]
    failures: list[tuple[int, BaseException]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[RunRecord] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.results for w in r.warnings]

    def summary(self) -> dict[str, Any]:
        return {"shards": [{"shard": f"{r.shard_index}/{r.num_shards}", "file": r.shard_file,
                            "puzzles": r.total, "resumed": r.resumed, "new": r.generated,
                            "errors": r.errors, "limit": r.limit, "partial": r.partial}
                           for r in self.results]}

    def failure(self) -> UserError | None:
        """After the finished shards are recorded: the first failure, if any."""
        if not self.failures:
            return None
        index, exc = self.failures[0]
        if isinstance(exc, UserError):
            return exc
        count = len(self.results) + len(self.failures)
        return UserError(f"{len(self.failures)} of {count} Ray shard(s) failed (first: shard "
                         f"{index}: {type(exc).__name__}: {exc}). The finished shards are "
                         "recorded; run the command again to resume the rest.")


def resolve(job: Job) -> tuple[PredictJob, Shard]:
    """The shard job with every default filled in (where each came from goes to job.notes)."""
    spec = job.flags["shard"]
    backend = resolve_backend(job.settings.backend)
    data = Path(job.inputs["test"])
    model = train = None
    expression: list[Path] = []
    if backend in TRAINED_BACKENDS:
        train = _training_file(job.inputs.get("train"), data, job.ledger, backend, job.notes)
        if backend == "celltypist":
            expression = job.ledger.sources_of_latest(Kind.CELLS)
    else:
        found = from_ledger(job.ledger, job.inputs.get("model"), Kind.MODEL, "model")
        job.notes.append(found.note("model") or "")
        model = found.path
    out = job.output or Path("predictions") / (backend if model is None else model.name)
    settings = replace(job.settings, backend=backend)
    shard_job = PredictJob(data=data, output_dir=out, model=model, train=train,
                           expression=expression, shard_index=spec.index, num_shards=spec.count,
                           overwrite=job.overwrite, retry_errors=job.flag("retry_errors", False),
                           trust_remote_code=job.flag("trust_remote_code", False),
                           limit=job.flag("limit"), settings=settings)
    job.notes[:] = [n for n in job.notes if n]
    return shard_job, spec


def _training_file(given: Path | None, test: Path, manifest: Manifest, backend: str,
                   notes: list[str]) -> Path:
    """--train, else the train split beside the test file, Cell-o1's layout, the latest split."""
    train = given or manifest.sibling_output(test, Kind.TRAIN_PUZZLES)
    if train is None and (train := cello1_train_file(test)) is not None:
        notes.append(f"Training puzzles: {train} (Cell-o1's layout: ../train/train_data.json "
                     "beside the test file).")
    train = train or manifest.latest_output(Kind.TRAIN_PUZZLES)
    if train is None:
        raise UserError(f"--backend {backend} learns from training puzzles, and the manifest "
                        "records no split to take them from. Pass --train FILE.")
    return train


def step(job: Job, progress: Progress | None = None) -> PredictRun:
    """predict as a pipeline step: one shard here, or every shard as a Ray task with --ray."""
    shard_job, spec = resolve(job)
    if job.flag("ray", False):
        from cellpuzzle_cli.predict.ray_launch import run_on_ray

        results, failures = run_on_ray(shard_job, spec.count, job.flag("ray_address"),
                                       labelled(progress, "Ray shards"))
    else:
        results = [run_predict(shard_job, labelled(progress, f"Predicting shard {spec}"))]
        failures = []
    records = [shard_record(shard_job, r, job.ledger) for r in results]
    return PredictRun(results, failures, _limit_notes(results), records)


def _limit_notes(results: list[PredictResult]) -> list[str]:
    """What `--limit` left out, and how to predict the rest."""
    partial = [r for r in results if r.partial]
    if not partial:
        return []
    answered = sum(r.answered for r in partial)
    of = sum(r.shard_puzzles for r in partial)
    note = (f"Partial run (--limit {partial[0].limit}): the shard file(s) answer {answered} of "
            f"{of} puzzles, the first ones in predict's fixed order (by sha256 of the puzzle "
            "id); the manifest records the run as partial and `score` says so. Run the same "
            "command without --limit to predict the rest (the answered ones are kept).")
    return [note]


def shard_record(job: PredictJob, result: PredictResult, manifest: Manifest) -> RunRecord:
    """One finished shard as a manifest entry (`score` gathers a run's shards from these)."""
    inputs = [Artifact(Path(job.data), "test")]
    if result.backend in TRAINED_BACKENDS:
        inputs.append(Artifact(Path(job.train), "train"))
    else:
        inputs.append(Artifact(Path(job.model), "model"))
    params: dict[str, Any] = {
        "output_dir": manifest.relative(result.output_dir), "num_shards": result.num_shards,
        "shard_index": result.shard_index, "complete": True, "backend": result.backend,
        "model": result.model, "puzzles": result.total, "errors": result.errors,
        "resumed": result.resumed, "config": asdict(job.settings),
        "trust_remote_code": job.trust_remote_code, "limit": result.limit,
        "partial": result.partial, "answered": result.answered,
        "shard_puzzles": result.shard_puzzles,
    }
    return RunRecord(params, inputs, [Artifact(result.shard_file, "predictions", Kind.PREDICTIONS)])
