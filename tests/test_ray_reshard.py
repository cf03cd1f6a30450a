"""Ray backend, worker side: FSDP2 training over two rank actors, then resharding its
weights with a TransferPlan onto replicas on the same GPUs, on other GPUs, and onto a
tensor-parallel layout — exact, and moving exactly the bytes the plan says.

The session-wide cluster of tests/conftest.py (4 fake GPUs on CPU), one RankWorker
actor per GPU in a module-scoped placement group, gloo.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("ray")
torch = pytest.importorskip("torch")

import graphrl as gr  # noqa: E402
from graphrl.backends.engines.hf import HFEngine  # noqa: E402
from graphrl.backends.ray.cluster import (mesh_placement_group,  # noqa: E402
                                          remove_mesh_placement_group)
from graphrl.backends.ray.group import RankGroup, WorkerError  # noqa: E402
from graphrl.backends.ray.sharded import (fsdp_layout, param_specs,  # noqa: E402
                                          replicated_layout, shard_batch)
from graphrl.parallel import DeviceMesh, Strategy  # noqa: E402
from graphrl.reshard_plan import (bucketize, extract, plan_model_reshard,  # noqa: E402
                                         verify_transfer_plan)
from graphrl.shard import Box, ModelLayout, TensorLayout, model_layout  # noqa: E402

# vocab 65: the embedding and lm_head split 33 / 32 rows, an uneven FSDP2 chunk; fp32:
# the FSDP2 step is compared with one process exactly (bf16 FSDP2: test_precision.py)
DECL = gr.ModelDecl("policy", gr.ModelSpec("llama", 65, 32, 2, 2, 1, 64, 32, "lm",
                                           dtype="fp32"), "policy", True)
OPTIONS = {"lr": 1e-2}
ENV = {"GLOO_SOCKET_IFNAME": "lo"}
TIMEOUT = 60.0


def batch(n: int = 4, seq: int = 8, vocab: int = 65) -> dict:
    """A PPO train batch of random tokens < vocab (responses: the second half)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(n, seq)
    mask[:, seq // 2:] = 1.0
    return {"rollout": {"tokens": torch.randint(0, vocab, (n, seq), generator=g),
                        "response_mask": mask},
            "old_logprobs": {"logprobs": -3.0 * torch.rand(n, seq, generator=g)},
            "advantages": {"advantages": torch.randn(n, seq, generator=g)}}


@pytest.fixture(scope="module")
def ranks(ray_session):
    """Four rank actors on the session-wide cluster (tests/conftest.py: 4 fake GPUs)."""
    with four_ranks() as group:
        group.new_group("train", [0, 1])
        yield group


@contextmanager
def four_ranks(timeout_s: float = TIMEOUT, worker: Any = None):
    """Four rank actors (of `worker`, default RankWorker) in one placement group, joined
    in a process group; shut down and the group removed on exit."""
    group = pg = None
    try:
        pg = mesh_placement_group(4, timeout_s=timeout_s)
        group = RankGroup.spawn(4, placement_group=pg, env=ENV, timeout_s=timeout_s,
                                **({"worker": worker} if worker is not None else {}))
        group.init_process_group(timeout_s=timeout_s)
        yield group
    finally:
        if group is not None:
            group.shutdown()
        if pg is not None:
            remove_mesh_placement_group(pg)


@pytest.fixture(scope="module")
def specs():
    return param_specs(DECL)


@pytest.fixture(scope="module")
def trained(ranks, specs):
    """FSDP2 over ranks 0-1, one PPO step on each rank's half of the batch; returns
    (layout, full weights after the step, stats per rank)."""
    layouts = ranks.call("build_fsdp_engine", "policy", DECL, OPTIONS, "train", on=[0, 1])
    assert layouts[0] == layouts[1] == fsdp_layout(specs, [0, 1])
    data = batch()
    stats = ranks.call_each("train", {r: (("policy", shard_batch(data, r, 2)),
                                          {"loss": "ppo", "seed": 0}) for r in (0, 1)})
    full = ranks.call("export_weights", "policy", on=[0, 1])
    assert all(torch.equal(full[0][k], full[1][k]) for k in full[0])
    return layouts[0], full[0], stats


def test_fsdp_step_matches_one_process(ranks, trained):
    _, full, _ = trained
    ref = HFEngine(DECL, OPTIONS, seed=0)
    before = ref.export_weights()
    ref.train(batch(), loss="ppo", seed=0)
    want = ref.export_weights()
    assert list(full) == list(want)
    assert all(torch.allclose(full[k], want[k], atol=1e-5) for k in want)
    assert any(not torch.equal(before[k], want[k]) for k in want)
    assert ranks.call("version", "policy", on=[0, 1]) == {0: 1, 1: 1}


def test_fsdp_shards_are_the_dim0_layout(ranks, trained):
    layout, full, _ = trained
    shards = ranks.call("export_shards", "policy", on=[0, 1])
    for name, lay in layout.items():
        for gpu in (0, 1):
            want = extract(full[name].numpy(), lay, gpu)
            assert [tuple(a.shape) for a in shards[gpu][name]] == [w.shape for w in want]
            assert all(torch.equal(a, torch.from_numpy(w))
                       for a, w in zip(shards[gpu][name], want)), name
    emb = layout["model.embed_tokens.weight"]
    assert [p.extents for _, p in emb.pieces] == [(33, 32), (32, 32)]


def _check_traffic(plan, stats):
    for gpu, st in stats.items():
        assert st.sent_bytes == plan.bytes_sent_by(gpu), gpu
        assert st.received_bytes == plan.bytes_received_by(gpu), gpu
        assert st.local_bytes == plan.local_bytes_on(gpu), gpu


@pytest.mark.parametrize("gpus,budget", [((0, 1), None), ((2, 3), None), ((2, 3), 3000)],
                         ids=["same-gpus", "other-gpus", "other-gpus-bucketed"])
def test_reshard_fsdp_to_replicas(ranks, specs, trained, gpus, budget):
    layout, full, _ = trained
    model = f"gen-{gpus[0]}{gpus[1]}-{budget}"
    ranks.call("build_replicated_engine", model, DECL, {}, list(gpus), seed=1,
               on=list(gpus))
    plan = plan_model_reshard(layout, replicated_layout(specs, gpus), itemsize=4)
    for _, p in plan.plans:
        verify_transfer_plan(p)
    buckets = None if budget is None else bucketize(plan, budget)
    assert buckets is None or len(buckets) > 1
    stats = ranks.reshard(plan, "policy", model, buckets=buckets)
    assert set(stats) == {0, 1} | set(gpus)
    _check_traffic(plan, stats)
    if gpus == (0, 1):   # colocated: each rank keeps its own shard, fetches the other
        assert all(stats[g].local_bytes > 0 and stats[g].sent_bytes > 0 for g in gpus)
    else:
        assert all(stats[g].local_bytes == 0 and stats[g].sent_bytes == 0 for g in gpus)
    got = ranks.call("export_weights", model, on=list(gpus))
    for gpu in gpus:
        assert list(got[gpu]) == list(full)
        assert all(torch.equal(got[gpu][k], full[k]) for k in full), gpu
    ref = HFEngine(DECL, {}, seed=2)
    ref.load_weights(full)
    rollout = {"tokens": batch()["rollout"]["tokens"]}
    lp = ranks.call("forward", model, rollout, on=[gpus[0]])[gpus[0]]
    assert torch.equal(lp["logprobs"], ref.forward(rollout)["logprobs"])


def test_reshard_fsdp_to_tensor_parallel(ranks, specs, trained):
    layout, full, _ = trained
    tp = model_layout(specs, DeviceMesh((3, 2)), Strategy(tp=2),
                      num_layers=DECL.spec.num_layers)
    ranks.call("build_buffers", "tp", tp, "float32", on=[2, 3])
    plan = plan_model_reshard(layout, tp, itemsize=4)
    stats = ranks.reshard(plan, "policy", "tp")
    _check_traffic(plan, stats)
    shards = ranks.call("export_shards", "tp", on=[2, 3])
    for name, lay in tp.items():
        for gpu in (2, 3):
            want = extract(full[name].numpy(), lay, gpu)
            assert all(torch.equal(a, torch.from_numpy(w))
                       for a, w in zip(shards[gpu][name], want)), (name, gpu)


def test_fsdp_load_weights_takes_each_ranks_chunks(ranks, trained):
    layout, full, _ = trained
    other = HFEngine(DECL, {}, seed=5).export_weights()
    try:
        ranks.call("load_weights", "policy", other, on=[0, 1])
        got = ranks.call("export_weights", "policy", on=[0, 1])
        assert all(torch.equal(got[g][k], other[k]) for g in (0, 1) for k in other)
    finally:   # later tests reshard the trained weights
        ranks.call("load_weights", "policy", full, on=[0, 1])
    got = ranks.call("export_weights", "policy", on=[0, 1])
    assert all(torch.equal(got[0][k], full[k]) for k in full)


def test_worker_error_names_the_rank(ranks):
    with pytest.raises(WorkerError, match=r"rank 2: train failed.*no engine for model"):
        ranks.call("train", "nope", {}, loss="ppo", on=[2])


def test_killed_actor_fails_fast_and_names_its_rank(ranks):
    """A dead peer: the driver's call names the dead rank at once; a live rank sending
    to it fails within its own timeout, naming both GPUs — neither hangs."""
    pair = RankGroup.spawn(2, num_gpus=0, env=ENV, timeout_s=TIMEOUT)
    try:
        pair.init_process_group(timeout_s=TIMEOUT)
        src = ModelLayout((("x", TensorLayout((64,), ((0, Box(((0, 64),))),))),))
        dst = ModelLayout((("x", TensorLayout((64,), ((1, Box(((0, 64),))),))),))
        plan = plan_model_reshard(src, dst, itemsize=4)
        pair.call("build_buffers", "x", src, "float32", on=[0])
        pair.kill(1)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 0: reshard failed.*GPU 0 sending to GPU 1"):
            pair.call_each("reshard", {0: ((plan, "x", "x"), {"timeout_s": 5.0})},
                           deadline_s=20.0)
        assert time.monotonic() - t0 < 20.0
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1: worker died during barrier") as err:
            pair.call("barrier", "world", 30.0, deadline_s=20.0)
        assert err.value.rank == 1 and time.monotonic() - t0 < 20.0
    finally:
        pair.shutdown()
