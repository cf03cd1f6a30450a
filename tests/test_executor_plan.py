"""What the Ray executor derives from a plan before starting anything (no Ray here):
engines per model, the dispatch order, and the engine hooks that make a batch split over
data-parallel ranks compute what one process computes."""
from __future__ import annotations

import threading

import pytest
import torch

import graphrl as gr
from conftest import load_build
from graphrl.backends.engines.hf import HFEngine
from graphrl.backends.ray.assign import assign_engines, dispatch_order, split_rows
from graphrl.cluster import ClusterSpec
from graphrl.compiler import compile_graph
from graphrl.errors import UsageError

PLACEMENT = {"policy.train": {"gpus": "0-1", "dp": 2, "zero": 3},
             "policy.generate": {"gpus": "2-3"}}


@pytest.fixture(scope="module")
def program():
    # fp32: plans and one-process runs are compared exactly
    return load_build("ppo")(gr.RunOptions(batch_size=8, precision="fp32")).program()


@pytest.fixture(scope="module", params=["pinned", "auto"])
def plan(request, program):
    pins = PLACEMENT if request.param == "pinned" else None
    return compile_graph(program.graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=pins).plan


def test_engines_per_model(program):
    plan = compile_graph(program.graph, ClusterSpec.parse("1x4xcpu"), "auto",
                         placement=PLACEMENT).plan
    eng = assign_engines(plan.graph, program.models, seed=3)
    s = eng.specs
    assert (s["policy"].kind, s["policy"].gpus, s["policy"].group) == ("fsdp", (0, 1),
                                                                        "mesh:0,1")
    assert (s["policy.gen"].kind, s["policy.gen"].gpus) == ("replicas", (2, 3))
    assert s["reference"].init_from.name == "policy" and s["reference"].kind == "replicas"
    assert eng.gen_engine == {"policy": "policy.gen"}
    assert all(spec.seed == 3 for spec in s.values())
    noop = assign_engines(plan.graph, program.models, noop=True)
    assert {spec.kind for spec in noop.specs.values()} == {"noop"} and not noop.groups
    with pytest.raises(UsageError, match="has no placement"):
        assign_engines(program.graph, program.models)


def test_dispatch_order_keeps_streams_and_deps(plan):
    order = dispatch_order(plan)
    at = {i.id: k for k, g in enumerate(order) for _, i in g.members}
    assert len(at) == sum(len(s.instrs) for s in plan.streams)
    for s in plan.streams:
        positions = [at[i.id] for i in s.instrs]
        assert positions == sorted(positions), s.worker
        for i in s.instrs:
            assert all(at[d] <= at[i.id] for d in i.deps), i.id
    gangs = [g for g in order if g.op == "run" and len(g.members) > 1]
    assert all(len({i.node for _, i in g.members}) == 1 for g in gangs)


def test_split_rows_covers_the_batch():
    for batch, ranks in ((8, 2), (7, 3), (2, 4)):
        rows = [split_rows(batch, ranks, i) for i in range(ranks)]
        assert rows[0][0] == 0 and rows[-1][1] == batch
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_generate_split_over_ranks_samples_what_one_process_samples(program):
    m = program.models["policy"]
    eng = HFEngine(m.decl(), m.options, seed=0)
    prompts = {"tokens": torch.randint(0, 16, (6, 5), generator=torch.Generator().manual_seed(1))}
    kw = dict(max_new_tokens=6, temperature=1.0, samples=2, seed=77)
    whole = eng.generate(prompts, **kw)["tokens"]
    multinomial = torch.Generator().manual_seed(77)   # the old sampler, for reference
    assert whole.shape == (12, 11)
    parts = [eng.generate({"tokens": prompts["tokens"][lo:hi]}, noise_rows=(2 * lo, 12), **kw)
             for lo, hi in (split_rows(6, 3, i) for i in range(3))]
    assert torch.equal(torch.cat([p["tokens"] for p in parts]), whole)
    probs = torch.softmax(torch.randn(12, 16), -1)
    race = torch.Generator().manual_seed(77)
    noise = torch.empty_like(probs).exponential_(1, generator=race)
    assert torch.equal(torch.multinomial(probs, 1, generator=multinomial),
                       (probs / noise).argmax(-1, keepdim=True))


def test_train_shards_with_averaged_gradients_match_one_process(program):
    """Two ranks (threads here) each take half of every minibatch and average gradients
    after backward, as the Ray workers do over gloo: the same step as one process."""
    m = program.models["critic"]
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(8, 14)
    mask[:, 6:] = 1
    inputs = {"rollout": {"tokens": torch.randint(0, 16, (8, 14), generator=g),
                          "response_mask": mask},
              "old_values": {"values": torch.randn(8, 14, generator=g)},
              "returns": {"returns": torch.randn(8, 14, generator=g)}}
    kw = dict(loss="value", seed=3, epochs=2, minibatches=2, value_clip=0.5)
    ref = HFEngine(m.decl(), m.options, seed=0)
    want = ref.train(inputs, **kw)
    ranks = [HFEngine(m.decl(), m.options, seed=0) for _ in range(2)]
    barrier = threading.Barrier(2, timeout=60)

    def averager(i):
        def average():
            barrier.wait()
            if i == 0:
                for ps in zip(*(list(e.module.parameters()) for e in ranks)):
                    mean = (ps[0].grad + ps[1].grad) / 2
                    for p in ps:
                        p.grad.copy_(mean)
            barrier.wait()
        return average

    stats = [None, None]

    def run(i):
        ranks[i].after_backward = averager(i)
        stats[i] = ranks[i].train(inputs, shard=(i, 2), **kw)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for k in want:
        assert (stats[0][k] + stats[1][k]) / 2 == pytest.approx(want[k], rel=1e-5)
    a, b = ref.export_weights(), ranks[0].export_weights()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert all(torch.equal(b[k], ranks[1].export_weights()[k]) for k in b)
    with pytest.raises(UsageError, match="does not split into 3"):
        ranks[0].train(inputs, shard=(0, 3), **dict(kw, epochs=1))
