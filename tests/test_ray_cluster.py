"""Starting and stopping a local Ray cluster leaves no state behind; placement groups
that cannot be placed fail within their timeout."""
from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from graphrl.backends.ray.cluster import mesh_placement_group, start_ray  # noqa: E402
from graphrl.errors import UsageError  # noqa: E402


def test_session_leaves_no_state_and_refuses_clients_without_its_token(own_ray, tmp_path,
                                                                        monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("HOME", str(tmp_path))        # where Ray would write a token file
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    session = start_ray(num_gpus=2, num_cpus=1)
    try:
        assert session.address and os.path.isdir(session.temp_dir)
        assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
        assert ray.cluster_resources().get("GPU") == 2
        with pytest.raises(UsageError, match="already initialised"):
            start_ray(num_gpus=1)
        pg = mesh_placement_group(2, timeout_s=30)
        assert pg.bundle_count == 2
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="3 GPU bundles"):
            mesh_placement_group(3, timeout_s=2)
        assert time.monotonic() - t0 < 15
        join = ("import ray; ray.init(address=%r, log_to_driver=False); "
                "print('JOINED', ray.cluster_resources().get('GPU'))" % session.address)
        stranger = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run([sys.executable, "-c", join], env=stranger, timeout=120,
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and "JOINED" not in refused.stdout
        joined = subprocess.run([sys.executable, "-c", join], env=dict(os.environ),
                                timeout=120, capture_output=True, text=True)
        assert "JOINED 2.0" in joined.stdout, joined.stderr[-2000:]
    finally:
        session.shutdown()
    assert not ray.is_initialized()
    assert not any(k.startswith("RAY_AUTH") for k in os.environ)
    assert not os.path.exists(session.temp_dir)
    assert list(tmp_path.iterdir()) == []
    session.shutdown()   # twice is fine


def test_a_cluster_without_authentication_is_refused(own_ray, monkeypatch):
    with pytest.raises(UsageError, match="open to the network"):
        start_ray(num_gpus=1, auth="disabled")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(UsageError, match="RAY_AUTH_MODE=disabled"):
        start_ray(num_gpus=1)
    assert not ray.is_initialized()


def test_bad_arguments_are_usage_errors(own_ray):
    with pytest.raises(UsageError, match="auth"):
        start_ray(auth="maybe")
    with pytest.raises(UsageError, match="local cluster"):
        start_ray(num_gpus=2, address="auto")
    with pytest.raises(UsageError, match="at least one GPU"):
        mesh_placement_group(0)
