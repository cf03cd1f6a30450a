"""Start or join a Ray cluster, and reserve GPUs for a device mesh.

`start_ray` starts a local cluster (tests, laptops; `num_gpus` fake GPUs on CPU) or joins
one (`address`, e.g. after `ray start --head`). It returns a `RaySession` that owns what it
set up — the temp folder it made, the environment variables it set — and undoes it on
`shutdown()`, so a test run leaves nothing behind.

Security. Ray 2.60 binds its gRPC servers (GCS, raylet, workers) on every interface
whatever node IP it is given (checked with psutil), so a cluster graphrl starts is always
reachable from the network and must never run without authentication. `auth="session"`
(the default) turns on Ray's token authentication with a fresh random token held only in
this process's environment (inherited by Ray's workers; nothing written to disk), and the
node advertises 127.0.0.1, so only this process tree can use the cluster. `auth="default"`
keeps Ray's own behaviour (token auth with a token file under ~/.ray, for clusters other
drivers should join). Running without authentication is refused. Joining a cluster at
`address` uses whatever authentication that cluster was started with.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from graphrl.errors import UsageError

AUTH_MODES = ("session", "default")
PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")


@dataclass
class RaySession:
    """A connection to Ray made by `start_ray`; `shutdown()` disconnects and cleans up."""

    address: str
    namespace: str
    temp_dir: Optional[str]
    owns_temp_dir: bool
    saved_env: Mapping[str, Optional[str]] = field(default_factory=dict)
    closed: bool = False

    def shutdown(self) -> None:
        """Disconnect (stopping a local cluster), restore the environment, remove the
        temp folder this session made. Safe to call twice."""
        if self.closed:
            return
        import ray

        ray.shutdown()
        if self.saved_env:
            set_auth_env(self.saved_env)
        if self.owns_temp_dir and self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def set_auth_env(values: Mapping[str, Optional[str]]) -> dict[str, Optional[str]]:
    """Set (or, for None, remove) environment variables; return their previous values."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _reload_ray_auth_config()
    return saved


def _reload_ray_auth_config() -> None:
    """Ray reads RAY_AUTH_* into its config and token cache when first imported; re-read
    them after a change (private API of Ray 2.60, the one place graphrl touches it)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # older Ray without token authentication: nothing cached
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def session_token_env() -> dict[str, Optional[str]]:
    """Environment for token authentication with a fresh random token (auth="session")."""
    import secrets

    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_AUTH_TOKEN_PATH": None}


def start_ray(num_gpus: Optional[int] = None, address: Optional[str] = None,
              namespace: str = "graphrl", *, num_cpus: Optional[int] = None,
              temp_dir: Optional[str] = None, auth: str = "session",
              memory_monitor: bool = True) -> RaySession:
    """Start a local Ray cluster (`address` None) with `num_gpus` GPUs (fake ones on a
    machine without GPUs) and `num_cpus` CPUs, or join the cluster at `address`
    ("auto" or host:port). No dashboard; worker logs stay out of the driver's output.

    A local cluster keeps its session files in `temp_dir` (default: a fresh folder under
    the system temp dir, removed on shutdown). `memory_monitor=False` stops Ray from
    killing workers when the node's memory is nearly full (tests on a shared machine,
    where another process's memory would otherwise kill ours). Raises UsageError when
    Ray is already initialised in this process or the arguments contradict each other.
    """
    import ray

    if auth not in AUTH_MODES:
        why = (" (Ray listens on every interface: a cluster without authentication is "
               "open to the network)" if auth == "disabled" else "")
        raise UsageError(f"auth={auth!r}: use one of {', '.join(AUTH_MODES)}{why}")
    if ray.is_initialized():
        raise UsageError("Ray is already initialised in this process; shut it down first")
    if address is not None and (num_gpus is not None or num_cpus is not None or temp_dir
                                or not memory_monitor):
        raise UsageError("num_gpus, num_cpus, temp_dir and memory_monitor apply to a new "
                         "local cluster, "
                         f"not to joining {address}")
    if address is None and os.environ.get("RAY_AUTH_MODE") == "disabled":
        raise UsageError("RAY_AUTH_MODE=disabled: graphrl does not start a Ray cluster "
                         "without authentication (Ray listens on every interface); unset it")
    saved = set_auth_env(session_token_env()) if address is None and auth == "session" else {}
    owns = address is None and temp_dir is None
    if owns:
        # Short path: Ray puts unix sockets under it (108-byte limit on their paths).
        temp_dir = tempfile.mkdtemp(prefix="graphrl-ray-")
    session = RaySession("", namespace, temp_dir, owns, saved)
    try:
        if address is None:
            info = ray.init(num_gpus=num_gpus, num_cpus=num_cpus, namespace=namespace,
                            include_dashboard=False, log_to_driver=False,
                            _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
                            _system_config=None if memory_monitor
                            else {"memory_monitor_refresh_ms": 0})
        else:
            info = ray.init(address=address, namespace=namespace, log_to_driver=False)
    except BaseException:
        session.shutdown()
        raise
    session.address = str(info.address_info["address"])
    return session


def shutdown(session: Optional[RaySession] = None) -> None:
    """Shut down `session`, or, without one, just disconnect this process from Ray."""
    if session is not None:
        session.shutdown()
        return
    import ray

    ray.shutdown()


def mesh_placement_group(num_gpus: int, strategy: str = "STRICT_PACK", *,
                         cpus_per_bundle: float = 0.1, timeout_s: float = 60.0,
                         name: str = "") -> Any:
    """Reserve one {"GPU": 1, "CPU": cpus_per_bundle} bundle per mesh rank (bundle i for
    rank i) and wait until Ray has placed them. Raises TimeoutError (after removing the
    group) when the cluster cannot place them within `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if num_gpus < 1:
        raise UsageError(f"a mesh needs at least one GPU, got {num_gpus}")
    if strategy not in PLACEMENT_STRATEGIES:
        raise UsageError(f"placement strategy {strategy!r}: use one of "
                         f"{', '.join(PLACEMENT_STRATEGIES)}")
    bundles = [{"GPU": 1.0, "CPU": float(cpus_per_bundle)} for _ in range(num_gpus)]
    pg = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        avail = ray.available_resources()
        raise TimeoutError(
            f"placement group of {num_gpus} GPU bundles ({strategy}) not ready after "
            f"{timeout_s:.0f} s; available: GPU {avail.get('GPU', 0):g}, "
            f"CPU {avail.get('CPU', 0):g}") from None
    return pg


def remove_mesh_placement_group(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(pg)


__all__ = ["RaySession", "start_ray", "shutdown", "mesh_placement_group",
           "remove_mesh_placement_group", "AUTH_MODES", "PLACEMENT_STRATEGIES"]
