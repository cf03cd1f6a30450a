"""Generation priced as a serving engine: length distributions, KV waves, the tail.

A fixed distribution whose KV cache fits equals the closed-form generate cost exactly;
a batch whose KV exceeds the engine's share runs in waves instead of being infeasible
(the issue's 13B PPO 1024/1024 batch-1024 case on 16 A100s); long tails cost more than
their mean and less than every response at the cap; bad distributions are clear errors.
"""
from __future__ import annotations

import pytest

import graphrl as gr
from conftest import load_build
from graphrl import cost
from graphrl.cluster import A100_80G, H100_80G, ClusterSpec
from graphrl.compiler import compile_graph
from graphrl.lengths import LengthDist, fixed, parse
from graphrl.parallel import Strategy
from graphrl.serving import GPU_MEMORY_UTILIZATION, generation_spread, serve_generate
from graphrl.types import llama2

S7 = llama2("7b")
S13 = llama2("13b")


@pytest.mark.parametrize("engine", ["graph", "hf"])
@pytest.mark.parametrize("strategy", [Strategy(), Strategy(dp=2), Strategy(tp=4),
                                      Strategy(dp=2, tp=2)])
def test_fixed_lengths_equal_the_closed_form(engine, strategy):
    for batch, prompt, new in ((64, 512, 256), (8, 128, 1), (33, 100, 77)):
        want = cost.estimate(S7, "generate", batch, prompt, strategy, H100_80G, new, engine)
        for dist in (None, fixed(new), fixed(4 * new)):   # capped at max_new_tokens
            got = serve_generate(S7, batch, prompt, new, strategy, H100_80G, engine,
                                 lengths=dist)
            assert got.seconds == pytest.approx(want.seconds, rel=1e-12)
            assert got.peak_bytes == want.peak_memory_bytes


def test_kv_waves_stay_inside_the_engine_share():
    r = serve_generate(S13, 1024, 1024, 1024, Strategy(dp=2, tp=8), A100_80G, "graph")
    b = dict(r.breakdown)
    assert r.peak_bytes <= GPU_MEMORY_UTILIZATION * A100_80G.memory_bytes + 1
    assert 1 < b["waves"] < 4 and b["max_running"] < 512
    whole = cost.estimate(S13, "generate", 1024, 1024, Strategy(dp=2, tp=8), A100_80G, 1024,
                          "graph")
    assert whole.peak_memory_bytes > A100_80G.memory_bytes   # today's "108 GiB per GPU"
    assert r.seconds > whole.seconds   # waves re-read the weights: slower than all at once


def test_long_tail_costs_between_its_mean_and_its_cap():
    st = Strategy(dp=4, tp=2)
    tail = LengthDist("lognormal", 1024.0, 8192, 1.0)
    t = serve_generate(S7, 256, 512, 8192, st, H100_80G, "graph", lengths=tail).seconds
    t_mean = serve_generate(S7, 256, 512, 8192, st, H100_80G, "graph",
                            lengths=fixed(1024)).seconds
    t_cap = serve_generate(S7, 256, 512, 8192, st, H100_80G, "graph").seconds
    assert t_mean < t < t_cap
    p50, p90 = generation_spread(S7, 256, 512, 8192, st, H100_80G, "graph", lengths=tail,
                                 draws=6)
    assert 0 < p50 <= p90
    assert generation_spread(S7, 64, 512, 256, st, H100_80G, "graph", draws=2) == \
        pytest.approx((serve_generate(S7, 64, 512, 256, st, H100_80G, "graph").seconds,) * 2)


def test_length_distributions_parse_and_sample(tmp_path):
    d = parse("lognormal:mean=2048,max=16384")
    q = d.quantiles(1000)
    assert q.min() >= 1 and q.max() <= 16384 and 1500 < q.mean() < 2100
    assert (d.draw(50, 1) == d.draw(50, 1)).all()
    f = tmp_path / "lens.txt"
    f.write_text("# lengths\n10\n20\n30\n")
    e = parse(f"empirical:{f}")
    assert e.max_len == 30 and e.mean == 20 and list(e.quantiles(3)) == [10, 20, 30]
    assert parse("fixed:7").is_fixed and parse("fixed:7").capped(5).max_len == 5
    for bad, why in (("gamma:3", "unknown kind"), ("lognormal:mean=5", "mean=M,max=X"),
                     ("lognormal:mean=50,max=10", "mean"), ("fixed:x", "fixed:x"),
                     (f"empirical:{tmp_path}/nope", "empirical"),
                     ("lognormal:mean=5,max=9,sigma=0", "sigma")):
        with pytest.raises(gr.UsageError, match=why):
            parse(bad)


def test_13b_ppo_long_generation_on_16_a100_is_feasible():
    opts = gr.RunOptions(model_size="13b", prompt_len=1024, response_len=1024,
                         batch_size=1024)
    graph = load_build("ppo")(opts).program().graph
    c = compile_graph(graph, ClusterSpec.parse("2x8xA100-80G"), "auto", gen_engine="graph",
                      check=True)
    problem = c.problem
    gen = next(s for s in c.evaluation.schedule
               if problem.by_name[s.name].phase == "generate")
    assert gen.choice.peak_bytes <= A100_80G.memory_bytes
    assert c.plan.predicted_step_seconds > 0


def test_forward_and_train_price_packed_sequences_under_a_distribution():
    from graphrl.passes.assign_devices import problem_from_graph
    from graphrl.passes.base import PassContext

    opts = gr.RunOptions(model_size="7b-32k", prompt_len=256, response_len=8192, batch_size=32)
    graph = load_build("grpo")(opts).program().graph
    tail = parse("lognormal:mean=1024,max=8192")
    ctx = PassContext(ClusterSpec.parse("1x8xH100"), gen_engine="graph", lengths=tail)
    problem = problem_from_graph(graph, ctx)
    mean = tail.quantiles(512).mean()
    priced = {c.phase: problem._packed.get(c.name) for c in problem.calls
              if c.phase in ("forward", "train")}
    assert priced == {"forward": round(256 + mean), "train": round(256 + mean)}
    assert problem_from_graph(graph, PassContext(ctx.cluster))._packed == {}
