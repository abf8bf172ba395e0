"""Fan the n shards of a predict run out as Ray tasks.

Each task runs exactly what `cellpuzzle predict --shard i/n` runs (run_predict with that
shard), so the files are the same as launching the shards by hand; the caller records one
manifest entry per shard, as the hand-launched runs would. Paths are made absolute first:
on a remote cluster they must point at storage every node shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.settings import PredictJob
from cellpuzzle_cli.ray_cluster import check_ray_address

CONNECT_TIMEOUT_S = 3.0  # a live head answers in well under a second
LOCAL_CPUS = 2  # a local Ray instance stays small: shards mostly wait on their model


def _absolute(settings: PredictJob) -> PredictJob:
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else Path(p).resolve()

    return dataclasses.replace(settings, data=absolute(settings.data),
                               output_dir=absolute(settings.output_dir),
                               model=absolute(settings.model), train=absolute(settings.train))


def _run_shard(settings: PredictJob):
    from cellpuzzle_cli.predict.shard_run import run_predict

    return run_predict(settings)


def run_on_ray(settings: PredictJob, num_shards: int, address: str | None = None,
               progress: Callable[..., None] | None = None, num_cpus: int | None = None):
    """Run every shard of `num_shards` as a Ray task; returns (results, failures)."""
    if num_shards < 1:
        raise UserError(f"--num-shards {num_shards}: run at least one shard.")
    if address:
        check_ray_address(address, CONNECT_TIMEOUT_S)
    try:
        import ray
    except ImportError as exc:
        raise UserError("--ray needs Ray, which is not installed. Install it with "
                        "pip install 'cellpuzzle[ray]', or run the shards by hand with "
                        "--shard i/n.") from exc

    base = _absolute(settings)
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus or LOCAL_CPUS, include_dashboard=False,
                     log_to_driver=False)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_gpus=1 if gpus >= 1 else 0, num_cpus=1, max_retries=0)(_run_shard)
        pending = {task.remote(dataclasses.replace(base, shard_index=i, num_shards=num_shards)): i
                   for i in range(num_shards)}
        if progress:
            progress(advance=0, total=num_shards)
        results, failures = [], []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            try:
                results.append(ray.get(ready[0]))
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                failures.append((index, cause if cause is not None else exc))
            if progress:
                progress(advance=1)
        results.sort(key=lambda r: r.shard_index)
        return results, failures
    finally:
        if started_here:
            ray.shutdown()
