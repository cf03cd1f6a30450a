"""Start or join a Ray cluster, and reserve GPUs for a device mesh.

`start_ray` starts a local cluster (tests, laptops; `num_gpus` fake GPUs on CPU) or joins
one (`address`, e.g. after `ray start --head`). It returns a `RaySession` that owns what it
set up — the temp folder it made, the environment variables it set — and undoes it on
`shutdown()`, so a test run leaves nothing behind.

Authentication (Ray >= 2.59): a new local cluster turns on token auth by default and, when
no token is configured, writes one to `~/.ray/auth_token` and sets RAY_AUTH_MODE=token in
the driver's environment. `auth="disabled"` sets RAY_AUTH_MODE=disabled for the session
(tests: nothing is written under $HOME); `auth="default"` keeps Ray's behaviour (CLI).
Ray reads RAY_AUTH_MODE into its config when `ray` is first imported, so "disabled" agrees
with a driver started without RAY_AUTH_MODE, the usual case.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from graphrl.errors import UsageError

AUTH_MODES = ("default", "disabled")
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
        for key, old in self.saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        if self.owns_temp_dir and self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> "RaySession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _set_env(values: Mapping[str, str]) -> dict[str, Optional[str]]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    return saved


def start_ray(num_gpus: Optional[int] = None, address: Optional[str] = None,
              namespace: str = "graphrl", *, num_cpus: Optional[int] = None,
              temp_dir: Optional[str] = None, auth: str = "default",
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
        raise UsageError(f"auth={auth!r}: use one of {', '.join(AUTH_MODES)}")
    if ray.is_initialized():
        raise UsageError("Ray is already initialised in this process; shut it down first")
    if address is not None and (num_gpus is not None or num_cpus is not None or temp_dir
                                or not memory_monitor):
        raise UsageError("num_gpus, num_cpus, temp_dir and memory_monitor apply to a new "
                         "local cluster, "
                         f"not to joining {address}")
    saved = _set_env({"RAY_AUTH_MODE": "disabled"}) if auth == "disabled" else {}
    owns = address is None and temp_dir is None
    if owns:
        # Short path: Ray puts unix sockets under it (108-byte limit on their paths).
        temp_dir = tempfile.mkdtemp(prefix="graphrl-ray-")
    session = RaySession("", namespace, temp_dir, owns, saved)
    try:
        if address is None:
            info = ray.init(num_gpus=num_gpus, num_cpus=num_cpus, namespace=namespace,
                            include_dashboard=False, log_to_driver=False,
                            _temp_dir=temp_dir,
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
