"""The executed strategy is the planned one: PPO on Ray (1x4xcpu) with the policy trained
by megatron-core (tp 2 x pp 2, 1F1B) and the critic by DeepSpeed (ZeRO-2, dp 4) on the
same four ranks learns like the local one-process run; the policy's reshard from the
megatron layout to the generation replicas is exact and moves the planned bytes; every
call ran with the engine and degrees of its plan, as the measured trace records per call
(policy.forward shares the megatron engine of policy.train, so the compiler plans it
tp 2 x pp 2 too: graphrl.engines.shared_strategy). The run's sharded checkpoint resumes
onto another placement and on the local backend (graphrl.checkpoint; issue 11)."""
from __future__ import annotations

import io

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")

import graphrl as gr  # noqa: E402
from graphrl.backends.local import LocalExecutor  # noqa: E402
from graphrl.cluster import ClusterSpec  # noqa: E402
from graphrl.compiler import compile_graph  # noqa: E402
from graphrl.engines import (degree_mismatches, parse_degrees, planned_degrees,  # noqa: E402
                             resolve_engines)
from graphrl.runner import run_experiment  # noqa: E402
from graphrl.timeline import read_chrome_trace  # noqa: E402

from test_ray_executor import BATCH, ITERATIONS, SEED, ppo_experiment  # noqa: E402

PLACEMENT = {"policy.train": {"gpus": "0-3", "tp": 2, "pp": 2, "engine": "megatron"},
             "critic.train": {"gpus": "0-3", "dp": 4, "zero": 2, "engine": "deepspeed"}}
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def exp():
    return ppo_experiment()


@pytest.fixture(scope="module")
def plan(exp):
    return compile_graph(exp.program().graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT, engines=True).plan


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """Where the Ray run writes its sharded checkpoints (tests/test_checkpoint_ray_engines.py
    resumes from them)."""
    return tmp_path_factory.mktemp("ray_engines_ckpt")


@pytest.fixture(scope="module")
def ray_run(ray_session, exp, plan, tmp_path_factory, ckpt_dir):
    from graphrl.backends.ray.executor import RayExecutor

    trace = tmp_path_factory.mktemp("ray_engines") / "trace.json"
    ex = RayExecutor(exp.program(), plan, seed=SEED, timeout_s=TIMEOUT, check_reshards=True,
                     env={"GLOO_SOCKET_IFNAME": "lo"})
    try:
        out = io.StringIO()
        opts = gr.RunOptions(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True,
                             trace=str(trace), checkpoint_dir=str(ckpt_dir),
                             checkpoint_every=2)
        summary = run_experiment(exp, opts, out=out, executor=ex)
        result = summary, out.getvalue(), ex.call_engines(), list(ex.reshards), trace
    finally:
        ex.close()   # its GPUs are free for the resumed runs
    return result


@pytest.fixture(scope="module")
def local_summary(exp):
    local = LocalExecutor(exp.program(), seed=SEED)
    opts = gr.RunOptions(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True)
    return run_experiment(exp, opts, out=io.StringIO(), executor=local)


def test_megatron_and_deepspeed_learn_like_local(ray_run, local_summary):
    summary, out, engines, reshards, _ = ray_run
    for r, l in zip(summary.rows, local_summary.rows, strict=True):
        # same samples while the weights agree to float error (they do over 3 steps)
        assert r["reward_mean"] == pytest.approx(l["reward_mean"], abs=1e-6)
        for key in ("policy_stats/loss", "critic_stats/loss"):
            assert r[key] == pytest.approx(l[key], rel=1e-3, abs=1e-5), key
    # the engines and degrees that ran, as planned
    train = engines["policy.train"]
    assert (train["engine"], train["dp"], train["tp"], train["pp"], train["sp"]) == \
        ("megatron", 1, 2, 2, True)
    fwd = engines["policy.forward"]
    assert (fwd["engine"], fwd["dp"], fwd["tp"], fwd["pp"]) == ("megatron", 1, 2, 2)
    critic = engines["critic.train"]
    assert (critic["engine"], critic["dp"], critic["zero"]) == ("deepspeed", 4, 2)
    assert engines["policy.generate"]["engine"] == "hf"
    assert "engine and degrees per call" in out and "engine=megatron" in out
    # the reshard from megatron's TP x PP layout to the generation replicas
    assert reshards and all(r.exact is True for r in reshards)
    assert all(r.measured == r.transfer_plan for r in reshards)


def test_every_call_ran_as_planned_per_the_trace(ray_run, plan, exp):
    """From the measured trace: each call's ranks ran the engine and degrees its plan
    names (engine, dp, tp, pp, sp, ZeRO, micro-batches; optimizer offload for training),
    on every rank and every iteration; the report agrees."""
    _, out, engines, _, trace = ray_run
    resolved = resolve_engines(plan.graph, {n: m.engine for n, m in exp.program().models.items()})
    nodes = {n.name: n for n in plan.graph.nodes}
    seen: dict[str, set[str]] = {}
    for e in read_chrome_trace(trace):
        if not e.ran:
            continue
        n = nodes[e.node]
        planned = planned_degrees(resolved[n.name], n.target, n.placement.strategy,
                                  precision=plan.graph.model(n.model).spec.dtype)
        assert degree_mismatches(n.target, planned, parse_degrees(e.ran)) == [], \
            (n.call, n.placement.strategy.text(), e.ran)
        seen.setdefault(n.call, set()).add(e.worker)
    calls = {n.call: n for n in plan.graph.nodes if n.kind == "call"}
    assert set(seen) == set(calls)
    for call, n in calls.items():   # every rank of its mesh reported it
        assert seen[call] == {f"gpu{g}" for g in n.placement.mesh.gpus}, call
    assert all(e["differs"] == [] for e in engines.values()), engines
    fwd = next(n for n in plan.graph.nodes if n.call == "policy.forward")
    assert parse_degrees(next(e.ran for e in read_chrome_trace(trace)
                              if e.call == "policy.forward")) == {
        "engine": "megatron", "dp": 1, "tp": 2, "pp": 2, "sp": True, "zero": 0,
        # the plan's micro-batches (priced in fp32, 4 here; 2 when this plan was bf16)
        "micro_batches": fwd.placement.strategy.micro_batches, "precision": "fp32"}
    assert out.count("yes") >= len(calls) and "NO:" not in out


# The other placement a checkpoint of this run resumes onto: megatron dp 2 with ZeRO-1
# on GPUs 0-1 (instead of tp 2 x pp 2 on 0-3), DeepSpeed ZeRO-3 dp 2 on GPUs 2-3 (instead
# of ZeRO-2 dp 4 on 0-3).
OTHER = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 1, "engine": "megatron"},
         "policy.generate": {"gpus": "2-3"},
         "critic.train": {"gpus": "2-3", "dp": 2, "zero": 3, "engine": "deepspeed"}}


def test_sharded_checkpoint_resumes_on_other_placements(ray_run, local_summary, exp,
                                                        ckpt_dir, tmp_path):
    """The run's checkpoint after 2 iterations (every rank wrote its shard) resumes on
    Ray onto OTHER and on the local backend (HF engines); the resumed metrics match the
    uninterrupted local run within the tolerances above. A changed or missing shard is
    refused, naming the file, before anything starts."""
    import json
    import shutil

    summary = ray_run[0]
    ckpt = ckpt_dir / "ckpt-00000002"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for model in ("policy", "critic"):   # every rank wrote its shard, checksummed
        for f in [f"rank{r}.pt" for r in range(4)] + ["index.json"]:
            assert f"models/{model}/{f}" in manifest["files"], (model, f)
    index = json.loads((ckpt / "models" / "policy" / "index.json").read_text())
    assert (index["format"], index["tp"], index["pp"]) == ("megatron", 2, 2)
    assert json.loads((ckpt / "models" / "critic" / "index.json").read_text())["zero"] == 2
    placement = tmp_path / "other.json"
    placement.write_text(json.dumps(OTHER))
    base = dict(iterations=ITERATIONS, seed=SEED, batch_size=BATCH, quiet=True)
    ray = dict(backend="ray", cluster="1x4xcpu", call_timeout=TIMEOUT, **base)
    out = io.StringIO()
    resumed = run_experiment(exp, gr.RunOptions(placement=str(placement), resume=str(ckpt),
                                                **ray), out=out)
    assert "resumed from" in out.getvalue()
    local = run_experiment(exp, gr.RunOptions(resume=str(ckpt), **base), out=io.StringIO())
    assert list(resumed.rows[:2]) == list(local.rows[:2]) == list(summary.rows[:2])
    for rows in (resumed.rows, local.rows):
        for r, l in zip(rows, local_summary.rows, strict=True):
            assert r["reward_mean"] == pytest.approx(l["reward_mean"], abs=1e-6)
            for key in ("policy_stats/loss", "critic_stats/loss"):
                assert r[key] == pytest.approx(l[key], rel=1e-3, abs=1e-5), key
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = bad / "models" / "critic" / "rank2.pt"
    shard.write_bytes(shard.read_bytes()[:-8] + b"12345678")
    with pytest.raises(gr.UsageError, match="models/critic/rank2.pt fails its checksum"):
        run_experiment(exp, gr.RunOptions(resume=str(bad), **ray), out=io.StringIO())
    shutil.copy(ckpt / "models" / "critic" / "rank2.pt", shard)
    (bad / "models" / "policy" / "rank1.pt").unlink()
    with pytest.raises(gr.UsageError, match="models/policy/rank1.pt is missing"):
        run_experiment(exp, gr.RunOptions(resume=str(bad), **base), out=io.StringIO())
