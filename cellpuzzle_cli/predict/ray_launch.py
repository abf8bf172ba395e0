"""Fan the n shards of a predict run out as Ray tasks.

Each task runs exactly what `cellpuzzle predict --shard i/n` runs (run_predict with that
shard), so the files are the same as launching the shards by hand; the caller records one
manifest entry per shard, as the hand-launched runs would. Paths are made absolute first:
on a remote cluster they must point at storage every node shares.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path

from cellpuzzle_cli.errors import UserError
from cellpuzzle_cli.predict.settings import PredictSettings

CONNECT_TIMEOUT_S = 3.0
LOCAL_CPUS = 2  # a local Ray instance stays small: shards mostly wait on their model


def parse_address(address: str) -> tuple[str, int] | None:
    """`host:port` or `ray://host:port` -> (host, port); `auto`/`local` -> None (no probe)."""
    if address in ("auto", "local"):
        return None
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"--ray-address '{address}' is not host:port (e.g. 10.0.0.5:6379 or "
                        "ray://10.0.0.5:10001), nor 'auto'.")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast with a clear message instead of letting ray.init hang on a wrong address."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        raise UserError(f"Cannot reach the Ray cluster at {address} ({exc}). Check that its head "
                        "node is running (`ray status` there) and the port is open, or drop "
                        "--ray-address to start a local Ray instance.") from exc


def _absolute(settings: PredictSettings) -> PredictSettings:
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else Path(p).resolve()

    return dataclasses.replace(settings, data=absolute(settings.data),
                               output_dir=absolute(settings.output_dir),
                               model=absolute(settings.model), train=absolute(settings.train))


def _run_shard(settings: PredictSettings):
    from cellpuzzle_cli.predict import run_predict

    return run_predict(settings)


def run_on_ray(settings: PredictSettings, num_shards: int, address: str | None = None,
               progress: Callable[..., None] | None = None, num_cpus: int | None = None):
    """Run every shard of `num_shards` as a Ray task; returns (results, failures)."""
    if num_shards < 1:
        raise UserError(f"--num-shards {num_shards}: run at least one shard.")
    if address:
        check_reachable(address)
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
