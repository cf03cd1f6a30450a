"""Starting and stopping a local Ray cluster leaves no state behind; placement groups
that cannot be placed fail within their timeout."""
from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from graphrl.backends.ray.cluster import mesh_placement_group, start_ray  # noqa: E402
from graphrl.errors import UsageError  # noqa: E402


def test_session_leaves_no_state(own_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))        # where Ray would write a token
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    session = start_ray(num_gpus=2, num_cpus=1, auth="disabled")
    try:
        assert session.address and os.path.isdir(session.temp_dir)
        assert os.environ["RAY_AUTH_MODE"] == "disabled"
        assert ray.cluster_resources().get("GPU") == 2
        with pytest.raises(UsageError, match="already initialised"):
            start_ray(num_gpus=1)
        pg = mesh_placement_group(2, timeout_s=30)
        assert pg.bundle_count == 2
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="3 GPU bundles"):
            mesh_placement_group(3, timeout_s=2)
        assert time.monotonic() - t0 < 15
    finally:
        session.shutdown()
    assert not ray.is_initialized()
    assert "RAY_AUTH_MODE" not in os.environ
    assert not os.path.exists(session.temp_dir)
    assert list(tmp_path.iterdir()) == []
    session.shutdown()   # twice is fine


def test_bad_arguments_are_usage_errors(own_ray):
    with pytest.raises(UsageError, match="auth"):
        start_ray(auth="maybe")
    with pytest.raises(UsageError, match="local cluster"):
        start_ray(num_gpus=2, address="auto")
    with pytest.raises(UsageError, match="at least one GPU"):
        mesh_placement_group(0)
