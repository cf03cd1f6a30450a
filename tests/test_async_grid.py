"""`--staleness K` plans over a grid of examples x model sizes x clusters: each compile
gives a plan (synchronous or asynchronous) and says what async cost and why it lost, or
raises a GraphRLError with a message — never an internal error (issue 20 item 5)."""
from __future__ import annotations

import os

import pytest

import graphrl as gr
from conftest import load_build
from graphrl.async_cost import MAX_STALENESS
from graphrl.cli.compile import async_line, compare_rows
from graphrl.compiler import compile_graph
from graphrl.errors import GraphRLError, UsageError
from graphrl.placement_file import cluster_of

EXAMPLES = ("ppo", "grpo", "text_grpo")   # the examples that trace a step
SIZES = ("7b", "13b", "34b", "70b")
NODES = (1, 2, 4, 8, 16, 32)
# each cluster size once, examples and model sizes cycling (about 5 s a compile on a
# loaded CPU); GRAPHRL_ASYNC_GRID=full: every example on every cluster size (18)
SPARSE = [(EXAMPLES[j % 3], SIZES[j % 4], n) for j, n in enumerate(NODES)]
FULL = [(e, SIZES[(i + j) % len(SIZES)], n) for i, e in enumerate(EXAMPLES)
        for j, n in enumerate(NODES)]
GRID = FULL if os.environ.get("GRAPHRL_ASYNC_GRID") == "full" else SPARSE


def _graph(example: str, size: str, **kw):
    opts = gr.RunOptions(model_size=size, **kw)
    return load_build(example)(opts).program().graph


@pytest.mark.parametrize("example,size,nodes", GRID)
def test_every_example_compiles_with_staleness(example, size, nodes):
    graph = _graph(example, size)
    try:
        c = compile_graph(graph, cluster_of(f"{nodes}x8xH100"), "auto", gen_engine="graph",
                          staleness=1)
    except GraphRLError as e:   # infeasible: a clear message, not a traceback
        assert str(e).strip()
        return
    report = c.findings["async_report"]
    text = async_line(c.findings)
    assert text.startswith("async ")
    if report.plan is None:
        assert "infeasible" in text and report.why
    else:
        assert f"on {report.plan.pools} GPUs" in text
        assert report.staleness or report.why   # it either runs or says why it lost
    # the plan is whichever is faster, async only where its lowered step beats sync
    if report.staleness:
        assert c.plan.predicted_step_seconds == report.lowered_seconds < report.sync_seconds
    else:
        assert c.plan.predicted_step_seconds == report.sync_seconds


def test_an_unplaceable_split_is_skipped_not_blamed_on_the_user():
    # 7b GRPO on one node: generation on 1-3 GPUs leaves 5-7 GPUs no dp x tp x pp split
    # fits; those splits are skipped with their reason, the rest are priced
    c = compile_graph(_graph("grpo", "7b"), cluster_of("1x8xH100"), "auto",
                      gen_engine="graph", staleness=1)
    report = c.findings["async_report"]
    assert report.plan is not None and report.plan.gen_gpus >= 4
    assert any(pools == "1+7" for pools, _ in report.skipped)
    assert "pinned" not in " ".join(why for _, why in report.skipped)


def test_staleness_bound_and_its_note():
    graph = _graph("grpo", "7b")
    with pytest.raises(UsageError, match=f"at most {MAX_STALENESS}"):
        compile_graph(graph, cluster_of("2x8xH100"), "auto", staleness=MAX_STALENESS + 1)
    c = compile_graph(graph, cluster_of("2x8xH100"), "auto", gen_engine="graph",
                      staleness=4)
    report = c.findings["async_report"]
    assert report.bound == 4 and report.plan.staleness == 1
    assert "staleness 2..4 not used" in async_line(c.findings)
    # the synchronous plan is kept and the report says why
    assert c.findings["staleness"] == 0 and report.staleness == 0 and report.why


def test_compare_shows_auto_sync_and_async_rows():
    rows = compare_rows(_graph("grpo", "7b"), cluster_of("2x8xH100"), "graph",
                        staleness=1)
    auto = [r for r in rows if r["policy"] == "auto"]
    assert [r["mode"] for r in auto] == ["sync", "async"]
    sync, asy = auto
    assert asy["staleness"] == 1 and asy["split"] and asy["feasible"]
    assert asy["step_seconds"] != sync["step_seconds"]
    assert asy["chosen"] == (asy["step_seconds"] < sync["step_seconds"])
    assert asy["chosen"] or asy["error"]   # a losing async row says why


def test_benchmark_samples_its_declared_space():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from plan_quality_async import SPACE, sample

    ws = sample(40, 7)
    assert ws == sample(40, 7) and ws != sample(40, 8)   # seeded, not hand-picked
    for w in ws:
        assert w.algo in SPACE["algo"] and w.size in SPACE["size"]
        assert w.nodes * 8 >= 64 and w.batch in SPACE["batch"]
        assert SPACE["mean"][0] <= w.mean <= SPACE["mean"][1] and w.cap >= 2 * w.mean
        assert SPACE["staleness"][0] <= w.staleness <= SPACE["staleness"][1]
    assert len({(w.algo, w.size, w.nodes) for w in ws}) > 10


def test_compile_cli_reports_async_where_it_loses(capsys):
    # the command of issue 20: it used to end in a pin error nobody made, or crash
    from pathlib import Path

    from graphrl.cli import main

    example = str(Path(__file__).resolve().parents[1] / "examples" / "grpo.py")
    assert main(["compile", example, "--cluster", "1x8xH100", "--model-size", "7b",
                 "--staleness", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "predicted step:" in out and "pinned" not in out
    line = next(x for x in out.splitlines() if x.startswith("async staleness 1 on "))
    assert " vs sync " in line and ("sync kept: " in line or "async pays" in line)
    assert "staleness 2..3 not used" in out


def test_why_an_async_plan_lost_names_the_dominant_term():
    from graphrl.async_cost import AsyncPlan
    from graphrl.async_report import why_lost

    # step = max(head, train) + push + tail
    gen_bound = AsyncPlan(1, 32, 32, 90.0, 0.1, 20.0, "dp=4,tp=8,pp=1", 30.0, 4096)
    assert gen_bound.step_seconds == pytest.approx(90.1)
    assert why_lost(gen_bound, 90.1, 95.0, 64, 70.0) == ""          # it won
    assert why_lost(gen_bound, 90.1, 85.0, 64, 70.0).startswith(
        "generation-bound (generation pool too small): its tail alone")
    assert why_lost(gen_bound, 99.0, 95.0, 64, 70.0).startswith(
        "priced at 90.10 s, its lowered plan takes 99.00 s")
    train_bound = AsyncPlan(1, 32, 32, 10.0, 0.1, 50.0, "dp=4,tp=8,pp=1", 5.0, 100)
    assert why_lost(train_bound, 55.1, 50.0, 64, None).startswith("training-bound: the other")
