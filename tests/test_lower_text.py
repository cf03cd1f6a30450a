"""The placed IR is closed: its text lowers to the plan of the compile that printed it.

A compile's placed graph (the last pass before lower) is printed, parsed back and lowered
with nothing else at hand, and the plan must equal the compile's byte for byte (plan.json)
— here for every policy on long-tail and pinned cases; benchmarks/plan_quality.py checks
every plan of its suite (tests/test_plan_quality_smoke.py: its quick suite). Its placements are inputs: an edited strategy or mesh lowers to
the verified plan of the edit, priced by the cost model for that strategy, and a bad
edit is refused naming its line.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from graphrl.cli import main
from graphrl.cluster import ClusterSpec
from graphrl.cli.compile import POLICY_NAMES
from graphrl.compiler import compile_graph
from graphrl.errors import UsageError
from graphrl.lower_placed import lower_placed
from graphrl.parser import parse_graph
from graphrl.passes.lower import lower
from graphrl.simulate import simulate
from graphrl.verify import verify_plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import plan_quality as pq  # noqa: E402

# a long-tail case (a length distribution in the schedule line) and an A100 PPO case
CASES = [pq.Case("grpo", "7b", 2, prompt_len=1024, response_len=16384,
                 tail="lognormal:mean=3072,max=16384"),
         pq.Case("ppo", "13b", 1, gpu="A100", prompt_len=512, response_len=2048)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def compiled(request):
    case = request.param
    graph, cluster = pq.build_graph(case), ClusterSpec.parse(case.cluster)
    out = {}
    for policy in POLICY_NAMES:
        try:
            out[policy] = compile_graph(graph, cluster, policy, gen_engine=pq.GEN_ENGINE,
                                        response_lengths=case.dist)
        except UsageError:
            out[policy] = None   # infeasible under this policy
    assert out["auto"] is not None, case.name
    return cluster, out


def test_a_placed_graph_lowers_from_its_text_to_the_same_plan(compiled):
    cluster, by_policy = compiled
    for policy, c in by_policy.items():
        if c is None:
            continue
        text = c.graph.text()
        assert parse_graph(text) == c.graph, policy
        assert lower(parse_graph(text), cluster).to_json() == c.plan.to_json(), policy
        again = lower_placed(text, cluster)   # scheduled again from its placements
        assert again.changed == (), (policy, again.changed)
        assert again.plan.to_json() == c.plan.to_json(), policy


def test_the_cli_lowers_a_compile_dump_to_its_plan_json_byte_for_byte(tmp_path, capsys):
    first, second = tmp_path / "compile", tmp_path / "lower"
    assert main(["compile", "examples/ppo.py", "--cluster", "2x8xH100", "--model-size", "7b",
                 "--response-lengths", "lognormal:mean=700,max=2048",
                 "--dump", str(first)]) == 0
    out = capsys.readouterr().out
    spec = re.search(r"^pipeline: (.*)$", out, re.M).group(1)
    assert spec == ("assign-devices{policy=auto},choose-overlap,insert-reshard{exact=true},"
                    "price-stream{search=false},lower")
    dumps = sorted(p.name for p in first.glob("0*.txt"))
    assert dumps == ["000_traced.txt", "001_assign-devices.txt", "002_choose-overlap.txt",
                     "003_insert-reshard.txt", "004_price-stream.txt", "005_lower.txt"]
    assert main(["lower", str(first / "004_price-stream.txt"), "--dump", str(second)]) == 0
    assert "(as compiled)" in capsys.readouterr().out
    assert (second / "plan.json").read_bytes() == (first / "plan.json").read_bytes()
    # the printed pipeline compiles to the same plan
    third = tmp_path / "again"
    assert main(["compile", "examples/ppo.py", "--cluster", "2x8xH100", "--model-size", "7b",
                 "--response-lengths", "lognormal:mean=700,max=2048",
                 "--pipeline", spec, "--dump", str(third)]) == 0
    assert (third / "plan.json").read_bytes() == (first / "plan.json").read_bytes()


def _edit(text: str, call: str, new: str) -> str:
    """Replace the placement `@[...]{...}` on the line of `call` (e.g. forward[reference])."""
    lines = text.splitlines(keepends=True)
    k = next(i for i, ln in enumerate(lines) if f" {call}(" in ln)
    lines[k] = re.sub(r"@\[[^\]]*\]\{[^}]*\}", new, lines[k])
    return "".join(lines)


@pytest.fixture(scope="module")
def ppo_7b():
    graph = pq.build_graph(pq.Case("ppo", "7b", 2))
    cluster = ClusterSpec.parse("2x8xH100")
    return graph, cluster, compile_graph(graph, cluster, "auto", gen_engine=pq.GEN_ENGINE)


def test_an_edited_strategy_lowers_to_the_plan_of_the_edit(ppo_7b):
    graph, cluster, c = ppo_7b
    ref = next(n for n in c.graph.calls() if n.call == "reference.forward")
    mesh = ref.placement.mesh
    want = f"dp={mesh.size // 2},tp=2,pp=1"
    assert ref.placement.strategy.text() != want
    edited = _edit(c.graph.text(), "forward[reference]", f"@[{mesh.text()}]{{{want}}}")
    out = lower_placed(edited, cluster)
    verify_plan(out.plan)
    new = next(n for n in out.graph.calls() if n.call == "reference.forward")
    assert new.placement.strategy.text() == want and new.placement.mesh == mesh
    assert new.name in out.changed
    # priced by the cost model for the edited strategy, and the plan is its simulation
    problem = c.problem
    info = problem.by_name[new.name]
    assert new.timing.seconds == problem.cost(info, new.placement.strategy).seconds
    assert simulate(out.plan)[1] == out.plan.predicted_step_seconds
    assert out.plan.to_json() != c.plan.to_json()
    # the edited graph's own text is closed again
    assert lower_placed(out.graph.text(), cluster).changed == ()


def test_an_edited_mesh_moves_the_call(ppo_7b):
    graph, cluster, c = ppo_7b
    edited = _edit(c.graph.text(), "forward[reward]", "@[12-15]{dp=4,tp=1,pp=1}")
    out = lower_placed(edited, cluster)
    rm = next(n for n in out.graph.calls() if n.call == "reward.forward")
    assert rm.placement.mesh.gpus == (12, 13, 14, 15)
    assert {w for w, i in out.plan.instrs() if i.op == "run" and i.node == rm.name} == {
        12, 13, 14, 15}
    # a mesh too small for the call is refused naming its line, memory needed and offered
    with pytest.raises(UsageError, match=r"placed.txt line \d+ \(%rm_score\): .*reward.forward "
                                         r"needs [\d.]+ GiB per GPU"):
        lower_placed(_edit(c.graph.text(), "forward[reward]", "@[15]{dp=1,tp=1,pp=1}"),
                     cluster, where="placed.txt")


@pytest.mark.parametrize("call, placement, message", [
    ("forward[reference]", "@[0-7]{dp=8,tp=2,pp=1}", r"line \d+ \(%reference_logprobs\).*"
                                                       r"= 16, not the 8 GPUs"),
    ("forward[policy]", "@[0-3]{dp=4,tp=1,pp=1}", r"line \d+ .*share one mesh"),
])
def test_a_bad_edit_is_refused_naming_its_line(ppo_7b, call, placement, message):
    _, cluster, c = ppo_7b
    with pytest.raises(UsageError, match=message):
        lower_placed(_edit(c.graph.text(), call, placement), cluster, where="placed.txt")


def test_lower_refuses_what_is_not_a_placed_graph_for_this_cluster(ppo_7b, tmp_path, capsys):
    graph, cluster, c = ppo_7b
    with pytest.raises(UsageError, match="no schedule line"):
        lower_placed(graph.text())
    with pytest.raises(UsageError, match=r"line \d+: .*placed for 2x8xH100-80G, not 1x8xH100"):
        lower_placed(c.graph.text(), ClusterSpec.parse("1x8xH100"))
    unplaced = _edit(c.graph.text(), "generate[policy]", "")
    with pytest.raises(UsageError, match=r"line \d+: %rollout \(policy.generate\) has no "
                                         "placement"):
        lower_placed(unplaced)
    path = tmp_path / "p.txt"
    path.write_text(c.graph.text())
    assert main(["lower", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["predicted_step_seconds"] == got["simulated_step_seconds"] \
        == c.plan.predicted_step_seconds and got["changed"] == []
    assert main(["lower", str(tmp_path / "missing.txt")]) != 0
    assert "missing.txt" in capsys.readouterr().err


def test_an_async_compile_dumps_the_chosen_plan_and_it_lowers_from_text(tmp_path, capsys):
    """--staleness compiles the synchronous step and async candidates, each dumped in a
    folder of its own; DIR's numbered dumps are the chosen plan's, whose last dump before
    lowering (price-stream's, the stream's price on the generate node) lowers to its
    plan.json byte for byte."""
    first, second = tmp_path / "compile", tmp_path / "lower"
    assert main(["compile", "examples/grpo.py", "--cluster", "4x8xH100", "--model-size",
                 "7b-64k", "--prompt-len", "1024", "--batch-size", "128",
                 "--response-lengths", "lognormal:mean=3072,max=16384", "--staleness", "1",
                 "--dump", str(first)]) == 0
    out = capsys.readouterr().out
    assert "async pays, running staleness 1" in out
    assert (first / "sync" / "004_price-stream.txt").exists()
    assert (first / "async-1" / "004_price-stream.txt").exists()
    priced = (first / "004_price-stream.txt").read_text()
    assert priced == (first / "async-1" / "004_price-stream.txt").read_text()
    assert "head_seconds=" in priced and "stream_cut=" in priced
    assert main(["lower", str(first / "004_price-stream.txt"), "--dump", str(second)]) == 0
    assert "(as compiled)" in capsys.readouterr().out
    assert (second / "plan.json").read_bytes() == (first / "plan.json").read_bytes()
