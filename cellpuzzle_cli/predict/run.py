"""The service behind `cellpuzzle predict`: resolve every default once, run, say what to record.

The command module only parses options into a `PredictRequest`. Here the backend is chosen,
the test data, training data (baseline, celltypist) and model come from the manifest when not
given (Cell-o1's `../train/train_data.json` beside a `test/` file counts as given), the
output folder is named, and one shard runs here (or all of them as Ray tasks). Each finished
shard becomes one manifest entry, as if it had been launched by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.io import Progress, labelled
from cellpuzzle_cli.manifest import Artifact, Kind, Manifest, RunRecord
from cellpuzzle_cli.predict.backends import resolve_backend
from cellpuzzle_cli.predict.records import cello1_train_file
from cellpuzzle_cli.predict.settings import TRAINED_BACKENDS, PredictJob, PredictSettings
from cellpuzzle_cli.predict.shard_run import PredictResult, run_predict
from cellpuzzle_cli.predict.shards import Shard, parse_shard


@dataclass
class PredictRequest:
    """What the user asked for; `None` means "the default"."""

    config: PredictSettings
    model: Path | None = None
    data: Path | None = None
    train: Path | None = None
    output: Path | None = None
    shard: str | None = None
    ray: bool = False
    ray_address: str | None = None
    num_shards: int | None = None
    overwrite: bool = False
    retry_errors: bool = False
    trust_remote_code: bool = False


@dataclass
class PredictRun:
    """The finished shards, the failed ones (Ray), notes for the user and manifest entries."""

    results: list[PredictResult]
    failures: list[tuple[int, BaseException]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[RunRecord] = field(default_factory=list)

    def raise_failures(self) -> None:
        """After recording the finished shards: fail with the first failure, if any."""
        if not self.failures:
            return
        index, exc = self.failures[0]
        if isinstance(exc, UserError):
            raise exc
        count = len(self.results) + len(self.failures)
        raise UserError(f"{len(self.failures)} of {count} Ray shard(s) failed (first: shard "
                        f"{index}: {type(exc).__name__}: {exc}). The finished shards are "
                        "recorded; run the command again to resume the rest.")


def _shard_spec(req: PredictRequest) -> Shard:
    if req.ray:
        if req.shard is not None:
            raise UserError("--ray runs every shard itself: drop --shard and give --num-shards N.")
        if req.num_shards is None:
            raise UserError("--ray needs --num-shards N: the number of shards to run as Ray tasks "
                            "(e.g. one per GPU).")
        return parse_shard(f"0/{req.num_shards}")
    if req.num_shards is not None or req.ray_address is not None:
        raise UserError("--num-shards and --ray-address go with --ray. Without --ray, run one "
                        "shard per command with --shard i/n.")
    return parse_shard(req.shard)


def resolve(req: PredictRequest, manifest: Manifest) -> tuple[PredictJob, Shard, list[str]]:
    """Settings for `run_predict` with every default filled in, plus notes on where they came from."""
    spec = _shard_spec(req)
    backend = resolve_backend(req.config.backend)
    notes: list[str] = []
    data = manifest.input_or_latest(req.data, Kind.TEST_PUZZLES, "test data")
    notes.append(data.note("test data"))
    model = train = None
    expression: list[Path] = []
    if backend in TRAINED_BACKENDS:
        train = _training_file(req.train, data.path, manifest, backend, notes)
        if backend == "celltypist":
            expression = manifest.sources_of_latest(Kind.CELLS)
    else:
        found = manifest.input_or_latest(req.model, Kind.MODEL, "model")
        notes.append(found.note("model"))
        model = found.path
    out = req.output or Path("predictions") / (backend if model is None else model.name)
    config = PredictSettings(**{**asdict(req.config), "backend": backend})
    settings = PredictJob(data=data.path, output_dir=out, model=model, train=train,
                               expression=expression, shard_index=spec.index, num_shards=spec.count,
                               overwrite=req.overwrite, retry_errors=req.retry_errors,
                               trust_remote_code=req.trust_remote_code, config=config)
    return settings, spec, [n for n in notes if n]


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


def predict(req: PredictRequest, manifest: Manifest, progress: Progress | None = None) -> PredictRun:
    """Predict one shard here, or every shard as a Ray task with `req.ray`."""
    settings, spec, notes = resolve(req, manifest)
    if req.ray:
        from cellpuzzle_cli.predict.ray_launch import run_on_ray

        results, failures = run_on_ray(settings, spec.count, req.ray_address,
                                       labelled(progress, "Ray shards"))
    else:
        results = [run_predict(settings, labelled(progress, f"Predicting shard {spec}"))]
        failures = []
    records = [shard_record(settings, r, manifest) for r in results]
    return PredictRun(results, failures, notes, records)


def shard_record(settings: PredictJob, result: PredictResult, manifest: Manifest) -> RunRecord:
    """One finished shard as a manifest entry (`score` gathers a run's shards from these)."""
    inputs = [Artifact(Path(settings.data), "test")]
    if result.backend in TRAINED_BACKENDS:
        inputs.append(Artifact(Path(settings.train), "train"))
    else:
        inputs.append(Artifact(Path(settings.model), "model"))
    params: dict[str, Any] = {
        "output_dir": manifest.relative(result.output_dir), "num_shards": result.num_shards,
        "shard_index": result.shard_index, "complete": True, "backend": result.backend,
        "model": result.model, "puzzles": result.total, "errors": result.errors,
        "resumed": result.resumed, "config": asdict(settings.config),
        "trust_remote_code": settings.trust_remote_code,
    }
    return RunRecord(params, inputs, [Artifact(result.shard_file, "predictions")])
