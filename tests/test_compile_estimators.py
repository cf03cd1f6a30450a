"""The estimator and DAPO examples compile for a real cluster: ReMax's two generate
calls are both placed (and share one reshard where their layouts agree), and DAPO's plan
prices generation of the oversampled batch and every call after the filter on the kept
one, with the factor in the IR."""
from __future__ import annotations

import contextlib
import importlib
import io

import pytest

from graphrl.cli import main
from graphrl.placement_file import cluster_of
from graphrl.compiler import compile_graph
from graphrl.experiment import RunOptions
from graphrl.lower_placed import lower_placed
from graphrl.parser import parse_graph

PLANNING = dict(model_size="7b", prompt_len=1024, response_len=1024, batch_size=256)


def compiled(example: str, **options):
    build = importlib.import_module(example).build   # examples/ is on sys.path (conftest)
    graph = build(RunOptions(**PLANNING), **options).program().graph
    return compile_graph(graph, cluster_of("2x8xH100"), gen_engine="graph")


@pytest.mark.parametrize("example", ["rloo", "reinforce_pp", "remax", "dapo"])
def test_graphrl_compile_for_a_cluster(example, root):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compile", str(root / "examples" / f"{example}.py"), "--cluster",
                   "2x8xH100", "--model-size", "7b", "--prompt-len", "1024",
                   "--response-len", "1024", "--batch-size", "256"])
    assert rc == 0
    assert "predicted step:" in buf.getvalue()
    line = ("dynamic_sampling %kept: generates 2048 rows, trains on at most 1024 "
            "(keep_fraction 0.5: oversampled x2.00)")
    assert (line in buf.getvalue()) == (example == "dapo")


def test_remax_places_both_generates():
    c = compiled("remax")
    gens = [n for n in c.graph.nodes if n.target == "generate"]
    assert [n.attr("temperature") for n in gens] == [1.0, 0.0]
    assert [n.outputs[0].spec.batch for n in gens] == [1024, 256]
    assert all(n.placement is not None and n.timing.seconds > 0 for n in gens)
    reshards = [n for n in c.graph.nodes if n.target == "reshard"]
    outs = [v.name for n in reshards for v in n.outputs]
    assert len(outs) == len(set(outs)) and {g.inputs[0] for g in gens} <= set(outs)
    # the placed graph printed and parsed back is the same program
    assert parse_graph(c.graph.text()) == c.graph


@pytest.mark.parametrize("example", ["rloo", "reinforce_pp", "remax", "dapo"])
def test_the_placed_graph_schedules_again_to_its_plan(example):
    """Re-scheduled from its placements, a placed graph gives its own plan: ReMax's two
    generate calls of one name keep each its own strategy."""
    c = compiled(example)
    again = lower_placed(c.graph.text(), cluster_of("2x8xH100"))
    assert again.changed == ()
    assert again.plan.to_json() == c.plan.to_json()


def test_dapo_plan_prices_the_oversampled_generation():
    half, full = compiled("dapo"), compiled("dapo", keep_fraction=1.0)
    for c, prompts in ((half, 512), (full, 256)):
        g = c.graph
        gen = next(n for n in g.nodes if n.target == "generate")
        flt = next(n for n in g.nodes if n.target == "dynamic_sampling")
        train = next(n for n in g.nodes if n.target == "train")
        assert gen.outputs[0].spec.batch == prompts * 4
        assert g.value(train.inputs[1]).spec.batch == 256 * 4   # the kept batch
        assert flt.attr("keep_fraction") == (0.5 if prompts == 512 else 1.0)
        assert "keep_fraction=0.5" in g.text() or prompts == 256
    assert parse_graph(half.graph.text()) == half.graph   # the factor is in the IR
    seconds = lambda c, call: next(n.timing.seconds for n in c.graph.nodes  # noqa: E731
                                   if n.target == call)
    assert seconds(half, "generate") > 1.5 * seconds(full, "generate")
    assert seconds(half, "train") == pytest.approx(seconds(full, "train"), rel=0.05)
