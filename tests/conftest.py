"""Shared fixtures: the examples directory on sys.path, and small traced programs."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def load_build(name: str):
    from graphrl.cli import load_example

    return load_example(str(EXAMPLES / f"{name}.py"))


@pytest.fixture(scope="session")
def reward_models() -> dict:
    """Reward models the examples' set-up trained this session (see shared_prepare)."""
    return {}


def shared_prepare(exp, cache: dict, seed: int):
    """`exp` whose set-up (reward-model training) runs once per session for a given
    seed and initial reward weights: the PPO and GRPO examples train the same reward
    model (same config, seed and data), so a later experiment loads the weights and
    reports the stats the first training produced (each is really trained once)."""
    import dataclasses
    import hashlib

    prepare = exp.prepare

    def run(engines):
        engine = engines["reward"]
        digest = hashlib.sha256()
        for name, t in sorted(engine.export_weights().items()):
            digest.update(name.encode() + t.float().numpy().tobytes())   # bf16: as fp32
        key = (seed, digest.hexdigest())
        if key not in cache:
            stats = prepare(engines)
            cache[key] = (engine.export_weights(), engine.version, dict(stats))
        weights, version, stats = cache[key]
        engine.load_weights(weights)
        engine.version = version
        return stats

    return dataclasses.replace(exp, prepare=run)


class SharedRay:
    """One local Ray cluster (4 fake GPUs, 2 CPUs) for every Ray test of the session,
    started on first use (`session()`; each ray.init costs seconds). Ray can be
    initialised once per process: a test that needs its own cluster calls `stop()`
    first (the next `session()` starts a fresh one). No memory monitor (a shared CI
    machine's other processes must not get our workers killed); token authentication
    with a random per-session token kept in the environment (nothing written under
    $HOME); the session folder is removed on stop."""

    GPUS = 4

    def __init__(self) -> None:
        self._session = None

    def session(self):
        from graphrl.backends.ray.cluster import start_ray

        if self._session is None or self._session.closed:
            self._session = start_ray(num_gpus=self.GPUS, num_cpus=2,
                                      memory_monitor=False)
        return self._session

    def stop(self) -> None:
        if self._session is not None:
            self._session.shutdown()
            self._session = None


@pytest.fixture(scope="session")
def shared_ray():
    """The SharedRay of this test session (nothing starts until `.session()`)."""
    shared = SharedRay()
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def ray_session(shared_ray):
    """The shared Ray session, started if needed; module fixtures may depend on it."""
    return shared_ray.session()


@pytest.fixture
def own_ray(shared_ray):
    """For a test that starts and stops Ray itself: the shared session is stopped first."""
    shared_ray.stop()
    yield


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict:
    """family -> a saved random checkpoint of graphrl.families.TINY[family] (built once);
    also "llama2_attention_bias" (q, k, v, o biases) and "llama2_mlp_bias" (gate, up, down
    biases): Llama-2 with attention_bias=true / mlp_bias=true."""
    from graphrl.families import TINY, save_random_checkpoint

    root = tmp_path_factory.mktemp("families")
    configs = {**TINY, "llama2_attention_bias": {**TINY["llama2"], "attention_bias": True},
               "llama2_mlp_bias": {**TINY["llama2"], "mlp_bias": True}}
    return {f: str(save_random_checkpoint(c, root / f)) for f, c in configs.items()}


# -- running in parallel (pytest-xdist: `make test-parallel`) -----------------------------
# Tests that share a session's state run in one worker, each group as one unit: every
# Ray test (one Ray cluster a process, `shared_ray`), and the tests that share the trained
# reward models (`reward_models`: trained once per worker, so once in all), and the tests
# of the modules named for Ray (test_ray_cli.py, ...: Ray in subprocesses). The Ray tests
# are also marked `ray`: `make test-parallel` runs them alone after the rest (next to
# another worker, on 2 cores, their kill/restart runs missed their 60 s call deadlines).
XDIST_GROUPS = (("shared_ray", "ray"), ("ray_session", "ray"), ("own_ray", "ray"),
                ("reward_models", "reward_models"))


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): run in one pytest-xdist worker")
    config.addinivalue_line("markers", "ray: uses the session's Ray cluster (set in conftest)")


@pytest.hookimpl(tryfirst=True)   # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        group = next((g for fixture, g in XDIST_GROUPS if fixture in names), None)
        if group is None and "ray" in item.path.stem.split("_"):   # test_ray_cli.py, ...:
            group = "ray"   # their own Ray clusters, in subprocesses, with call deadlines
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
            if group == "ray":
                item.add_marker(pytest.mark.ray)
        # xdist 3.8 tells the scheduler a test's group by a "@group" suffix on its node
        # id, set as item._nodeid, which pytest >= 9.2 no longer reads (the id is now
        # item._id): add the suffix here (xdist's own assignment then changes nothing)
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        node_id = getattr(item, "_id", None)
        if (groups and getattr(config.option, "loadgroup", False)   # an xdist worker's flag
                and node_id is not None and "@" not in str(node_id).rpartition("]")[2]):
            item._id = type(node_id).parse(f"{node_id}@{'_'.join(groups)}")


# -- measuring the suite's cost (GRAPHRL_TEST_CPU=path) -----------------------------------
# With GRAPHRL_TEST_CPU set, each test's CPU seconds (user+system of this process and of
# the children it reaped during the test; setup, call and teardown) and wall seconds are
# appended to that file, one JSON line a test: on a shared machine CPU time is the steadier
# measure. A Ray cluster's processes are counted when it is stopped (its raylet reaped);
# ranks forked from the fork server (spawn's preload) are its children: not counted.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import os

    path = os.environ.get("GRAPHRL_TEST_CPU")
    if not path:
        yield
        return
    import json
    import resource
    import time

    def cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    c0, t0 = cpu(), time.monotonic()
    yield
    with open(path, "a") as f:
        f.write(json.dumps({"id": item.nodeid, "cpu": round(cpu() - c0, 3),
                            "wall": round(time.monotonic() - t0, 3)}) + "\n")
