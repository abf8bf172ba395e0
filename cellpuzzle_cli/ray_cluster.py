"""Is a Ray head really listening at an address? Asked before Ray is started or joined.

`ray.init(address=…)` on a wrong address can hang for minutes; `predict --ray` and `rl`
(verl) both ask here first and fail within a bounded time with a message naming the fix.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from cellpuzzle_cli.errors import UserError

DEFAULT_RAY_PORT = 6379
RAY_CLIENT_PORT = 10001
GCS_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
RAY_CLIENT_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"


def ray_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for an address; None for `auto`/`local` (Ray resolves those)."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"ray-gcs://{address}")
    if not parsed.hostname:
        raise UserError(f"'{address}' is not a Ray address. Give HOST:PORT (the head node's GCS, "
                        "port 6379 by default) or ray://HOST:10001 for Ray Client.")
    try:
        port = parsed.port
    except ValueError as exc:
        raise UserError(f"'{address}' has an invalid port.") from exc
    default = RAY_CLIENT_PORT if parsed.scheme == "ray" else DEFAULT_RAY_PORT
    return parsed.hostname, port or default


def check_ray_address(address: str, timeout_s: float) -> None:
    """Fail within `timeout_s` unless a Ray head answers at `address`.

    A TCP accept proves little (proxies and other services accept too), so we make one real,
    read-only Ray RPC: GCS `GetClusterId`, or Ray Client's `ClusterInfo` for ray://.
    """
    endpoint = ray_endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"No Ray cluster answers at {host}:{port} ({exc or type(exc).__name__}; "
                        f"waited at most {timeout_s:g}s). Start the head with `ray start --head`, "
                        "check the address and firewall, or leave out --ray-address to start a "
                        "local Ray.") from exc
    try:
        import grpc

        _RAY_ANSWERED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                         grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
    except ImportError:
        return  # ray[default] brings grpcio; without it the TCP check above is all we can do
    method = RAY_CLIENT_METHOD if address.startswith("ray://") else GCS_METHOD
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            channel.unary_unary(method)(b"", timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() in _RAY_ANSWERED:
                return  # Ray itself refused the request (e.g. an auth token): a live head
            raise UserError(f"Something listens at {host}:{port}, but it is not a Ray head: the "
                            f"Ray call {method} failed ({exc.code().name}: {exc.details()}; "
                            f"waited at most {timeout_s:g}s). The GCS port is 6379 unless `ray "
                            "start --port` changed it; Ray Client uses ray://HOST:10001.") from exc
