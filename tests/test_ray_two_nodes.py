"""Two Ray nodes of two fake GPUs each (ray.cluster_utils.Cluster, one machine): the
executor's ranks land node-aligned (every mesh of the plan on one node) and a plan whose
training and generation meshes sit on different nodes runs an iteration, resharding
across the nodes.

Its own cluster: the shared session is stopped first (one Ray per process); Ray's files
go to a temporary folder (RAY_TMPDIR), not /tmp/ray."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from conftest import load_build  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.experiment import RunOptions  # noqa: E402

PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
             "policy.generate": {"gpus": "2-3"}}


@pytest.fixture
def two_nodes(own_ray, monkeypatch, request):
    import shutil
    import tempfile

    from ray.cluster_utils import Cluster

    # a short folder (not under pytest's, which xdist makes longer): Ray puts unix sockets
    # under it (paths of at most 107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="grtest-"))
    request.addfinalizer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    (tmp / "ray").mkdir()     # Ray writes its address file there before the session's
    monkeypatch.setenv("RAY_TMPDIR", str(tmp))
    from graphrl.backends.ray.cluster import session_token_env, set_auth_env

    saved = set_auth_env(session_token_env())   # the nodes inherit the session's token
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=1, num_gpus=2, temp_dir=str(tmp / "ray"),
                         _system_config={"memory_monitor_refresh_ms": 0})
        cluster.add_node(num_cpus=1, num_gpus=2)
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, namespace="graphrl", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        set_auth_env(saved)


def test_meshes_are_node_aligned_and_a_two_node_plan_runs(two_nodes):
    from graphrl.backends.ray.executor import RayExecutor

    exp = dataclasses.replace(load_build("ppo")(RunOptions(batch_size=4)), prepare=None)
    plan = compile_graph(exp.program().graph, ClusterSpec.parse("2x2xcpu"), "auto",
                         placement=PLACEMENT).plan
    with RayExecutor(exp.program(), plan, timeout_s=60.0, check_reshards=True,
                     env={"GLOO_SOCKET_IFNAME": "lo"}) as ex:
        nodes = ex.rank_nodes
        assert len(set(nodes.values())) == 2
        assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
        for n in plan.graph.nodes:   # inside one node, or whole nodes
            if n.placement is not None:
                mesh = set(n.placement.mesh.gpus)
                touched = {nodes[g] for g in mesh}
                assert len(touched) == 1 or all(
                    g in mesh for g, node in nodes.items() if node in touched), n.call
        result = ex.run_step(exp.data(0), iteration=0)
        assert result.outputs["task_score"]["score"].shape == (4,)
        assert {e.worker for e in result.events} >= {"gpu0", "gpu1", "gpu2", "gpu3"}
        (r,) = ex.reshards
        assert r.exact and r.measured == r.transfer_plan and r.measured[0] > 0
