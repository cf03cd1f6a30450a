"""graphrl.dump: plan text, DOT, Gantt, Chrome trace and the dump folder.

Plans are built by hand (the compiler's lower pass is not used): a traced PPO graph with
placements, a tiny lowering below that adds send/recv pairs between meshes and the host,
an offload, and a policy reshard gang over the union of the train and generate meshes.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest

import graphrl
from graphrl.cluster import ClusterSpec
from graphrl.dump import (event_kind, gantt, human_bytes, human_seconds, merge_rows,
                          merged_label, model_colors, plan_dot, plan_text, write_dumps)
from graphrl.graph import SYSTEM, Node, Value
from graphrl.parallel import DeviceMesh, Strategy
from graphrl.plan import HOST, Plan, StreamBuilder
from graphrl.simulate import simulate
from graphrl.timeline import Event, chrome_trace
from graphrl.types import weights_spec

from conftest import load_build

PLACE = {  # node -> (first GPU, count, strategy)
    "%rollout": (0, 2, Strategy(tp=2)),
    "%policy_logprobs": (0, 2, Strategy(dp=2)),
    "%reference_logprobs": (2, 2, Strategy(dp=2)),
    "%rm_score": (2, 2, Strategy(dp=2)),
    "%critic_values": (2, 2, Strategy(dp=2)),
    "%policy@1": (0, 4, Strategy(dp=4, zero=3)),
    "%critic@1": (2, 2, Strategy(dp=2)),
}
SECONDS = {"generate": 2.0, "forward": 0.5, "train": 1.5}


def placed_graph():
    g = load_build("ppo")(graphrl.RunOptions(batch_size=4)).program().graph
    for name, (lo, count, strat) in PLACE.items():
        node = g.node(name)
        g = g.replace_node(name, dataclasses.replace(
            node, placement=graphrl.Placement(DeviceMesh.range(lo, count), strat)))
    # the policy reshard train layout -> generate layout, feeding the next step
    wspec = weights_spec("policy", g.model("policy").spec)
    reshard = Node(SYSTEM, "reshard", ("%policy@1",), ("Weights[policy]",),
                   (Value("%policy@1g", wspec),), model="policy",
                   placement=graphrl.Placement(DeviceMesh.range(0, 2), Strategy(tp=2)))
    g = dataclasses.replace(g, nodes=g.nodes + (reshard,),
                            carries=tuple((d, "%policy@1g" if s == "%policy@1" else s)
                                          for d, s in g.carries))
    return graphrl.verify_graph(g)


def lower_by_hand(g) -> Plan:
    """Topological order, gangs per node, a send/recv pair for every value crossing
    from one worker set to another (sent by the producer's first worker)."""
    b = StreamBuilder()
    home: dict[str, list[int]] = {v.name: [0] for v in g.inputs}  # inputs on GPU 0
    for n in g.nodes:
        workers = n.placement.mesh.gpus if n.placement is not None else (HOST,)
        for i in n.inputs:
            src = list(home[i])
            if g.value(i).spec.is_weights:
                continue
            nbytes = g.value(i).spec.nbytes
            for w in workers:
                if w in home[i]:
                    continue
                home[i].append(w)
                b.add(src[0], "send", value=i, peer=w, nbytes=nbytes, seconds=nbytes / 1e6,
                      label=f"send {i}")
                b.add(w, "recv", value=i, peer=src[0], nbytes=nbytes, seconds=nbytes / 1e6,
                      label=f"recv {i}")
        for w in workers:
            if n.kind == SYSTEM:
                b.add(w, "reshard", node=n.name, model=n.model, label=n.call,
                      nbytes=40_000 + 1000 * w, seconds=0.1 + 0.01 * w)
            else:
                b.add(w, "run", node=n.name, model=n.model, label=n.call,
                      seconds=SECONDS.get(n.target, 0.01), mem=(3 << 30) if n.model else 0)
        if n.kind == SYSTEM:  # the gang spans train and generate meshes
            for w in (2, 3):
                b.add(w, "reshard", node=n.name, model=n.model, label=n.call,
                      nbytes=40_000, seconds=0.12)
        if n.name == "%reference_logprobs":
            for w in workers:
                b.add(w, "offload", model="reference", nbytes=168_576, seconds=0.05)
        for v in n.outputs:
            home[v.name] = list(workers)
    b.add(HOST, "free", value="%rollout")
    streams = b.build()
    plan = Plan(g, ClusterSpec(1, 4), "split", streams, 0.0,
                resident=((0, "policy", 168_576), (1, "policy", 168_576),
                          (2, "critic", 210_562), (3, "critic", 210_562)),
                notes=(("why", "hand-built for tests"),))
    return dataclasses.replace(plan, predicted_step_seconds=simulate(plan)[1])


@pytest.fixture(scope="module")
def plan() -> Plan:
    return lower_by_hand(placed_graph())


def tiny_plan() -> Plan:
    """Four GPUs running one gang, a send/recv pair to the host, an op there."""
    g = placed_graph()
    b = StreamBuilder()
    for w in range(4):
        b.add(w, "run", node="%rollout", model="policy", label="policy.generate",
              seconds=2.31, mem=12 << 30)
    b.add(0, "send", value="%rollout", peer=HOST, nbytes=128 << 20, seconds=0.25)
    b.add(HOST, "recv", value="%rollout", peer=0, nbytes=128 << 20, seconds=0.25)
    b.add(HOST, "run", node="%task_score", label="task_score", seconds=0.5,
          deps=("w1.0",))
    return Plan(g, ClusterSpec(1, 4), "colocate-all", b.build(), 3.06)


# -- formatters ---------------------------------------------------------------------------

def test_human_units():
    assert [human_bytes(n) for n in (0, 672, 1023, 1024, 168_576, 128 << 20, 3.5 * 2**30)] \
        == ["0B", "672B", "1023B", "1.0KiB", "164.6KiB", "128.0MiB", "3.5GiB"]
    assert human_bytes(2**30 - 1) == "1.0GiB"  # no "1024.0MiB"
    assert [human_seconds(s) for s in (0, 12.5e-6, 0.0032, 2.314, 0.9999999, 250)] \
        == ["0s", "12.5us", "3.2ms", "2.31s", "1.00s", "250.00s"]


# -- plan text ----------------------------------------------------------------------------

def test_tiny_plan_text_exact_lines():
    text = plan_text(tiny_plan())
    lines = text.splitlines()
    assert lines[:5] == ["plan @ppo_step", "  cluster    1x4xH100-80G",
                         "  policy     colocate-all", "  predicted  3.06s per step",
                         "  workers    5 streams, 7 instructions"]
    assert "  w0.0  run      %rollout  policy.generate  2.31s  mem=12.0GiB" in lines
    assert "  w0.1  send     %rollout -> host  128.0MiB  250.0ms" in lines
    assert "  host.0  recv     %rollout <- w0  128.0MiB  250.0ms" in lines
    assert "  host.1  run      %task_score  task_score  500.0ms  deps=[w1.0]" in lines
    clock = lines[lines.index("== clock (simulated step 3.06s) =="):]
    assert clock[1:] == [
        " time | gpu0            | gpu1-3          | host",
        "0.00s | policy.generate | policy.generate",
        "2.31s | send %rollout   |                 | recv %rollout",
        "2.56s |                 |                 | task_score",
        "3.06s | end",
    ]


def test_plan_text_structure(plan):
    text = plan_text(plan)
    assert text == plan_text(plan)  # deterministic
    assert "0x" not in text and " at 0x" not in text  # no object ids
    assert text.startswith("plan @ppo_step\n  cluster    1x4xH100-80G\n  policy     split\n")
    sections = [ln for ln in text.splitlines() if ln.startswith("== ")]
    assert sections[:2] == ["== graph ==", "== streams =="]
    assert sections[2].startswith("== clock (simulated step ")
    assert plan.graph.text() in text
    for s in plan.streams:
        name = "host" if s.worker == HOST else f"w{s.worker}"
        assert f"stream {name}  ({len(s.instrs)} instructions)" in text
        for i in s.instrs:
            assert re.search(rf"^  {re.escape(i.id)} +{i.op} ", text, re.M), i.id
    assert re.search(r"reshard +%policy@1g  reshard\[policy\]  39\.1KiB  100\.0ms", text)
    assert re.search(r"send +%rollout -> w2  928B", text)
    assert re.search(r"offload +reference  164\.6KiB  50\.0ms", text)
    assert "resident (bytes per GPU between calls)\n  w0-1: policy 164.6KiB\n" \
           "  w2-3: critic 205.6KiB\n" in text


def test_clock_view_rows_in_time_order_and_merged(plan):
    lines = plan_text(plan).split("== clock")[1].splitlines()[1:]
    header = [c.strip() for c in lines[0].split(" | ")]
    # gpu0 sends what gpu1 does not; gpu2 and gpu3 are one gang throughout... except
    # their reshard parts differ in length, so they stay apart; the host is last.
    assert header[0] == "time" and header[-1] == "host"
    assert all(h.startswith("gpu") for h in header[1:-1])

    times = [float(ln.split(" | ")[0].strip().rstrip("s")) for ln in lines[1:]]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert lines[-1].split(" | ")[1].strip() == "end"
    events, step = simulate(plan)
    assert len(lines) - 2 == len({round(e.start, 9) for e in events})
    assert "send %prompts" in lines[1] and "policy.generate" in lines[2]
    assert "reshard[policy]" in lines[-2]


def test_json_round_trip(plan):
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text
    assert plan_text(back) == plan_text(plan)
    assert Plan.from_json(tiny_plan().to_json()) == tiny_plan()


def test_deadlocked_plan_still_prints(tmp_path):
    g = placed_graph()
    b = StreamBuilder()
    b.add(0, "send", value="%rollout", peer=1, nbytes=8, seconds=0.1)
    b.add(0, "recv", value="%x", peer=1, nbytes=8, seconds=0.1)
    b.add(1, "send", value="%x", peer=0, nbytes=8, seconds=0.1)
    b.add(1, "recv", value="%rollout", peer=0, nbytes=8, seconds=0.1)
    broken = Plan(g, ClusterSpec(1, 2), "broken", b.build(), 0.0)
    assert "== clock ==\n  no timeline: deadlock: " in plan_text(broken)
    with pytest.raises(ValueError, match="deadlock: .*wrote .*plan.dot"):
        write_dumps(broken, tmp_path)
    assert (tmp_path / "plan.txt").read_text() == plan_text(broken)


def test_empty_plan_text():
    empty = Plan(placed_graph(), ClusterSpec(1, 1), "none", (), 0.0)
    assert plan_text(empty).endswith("== clock (simulated step 0s) ==\n time\n0.00s | end\n")


# -- DOT ----------------------------------------------------------------------------------

def test_dot_structure(plan):
    dot = plan_dot(plan)
    assert dot.startswith('digraph "ppo_step" {') and dot.rstrip().endswith("}")
    assert dot == plan_dot(plan)
    assert dot.count("{") == dot.count("}")
    for n in plan.graph.nodes:
        assert re.search(rf'^\s+"{re.escape(n.name)}" \[label=', dot, re.M), n.name
    assert re.search(r'"%policy@1g" \[label="%policy@1g = reshard\[policy\]\\n@\[0-1\] '
                     r'dp=1,tp=2,pp=1", shape=diamond', dot)
    assert '"%rollout" -> "%policy_logprobs" [label="928B"]' in dot
    assert '"%policy@0" -> "%rollout" [label="164.6KiB"]' in dot
    assert '"%advantages" -> "%critic@1" [label="%returns 224B"]' in dot
    assert '"%policy@1g" -> "%policy@0" [style=dashed' in dot
    clusters = re.findall(r'subgraph (cluster_\d+) \{\n\s+label="([^"]+)"', dot)
    assert [c[1] for c in clusters] == ["mesh 0-1", "mesh 0-3", "mesh 2-3", "host"]
    # colours: by sorted model name, the same for every node of a model
    colors = model_colors(m.name for m in plan.graph.models)
    assert list(colors) == ["critic", "policy", "reference", "reward"]
    assert colors == model_colors(["reward", "policy", "critic", "reference", ""])
    fills = dict(re.findall(r'^\s+"(%[^"]+)" \[label=.*fillcolor="(#[0-9A-F]{6})"', dot, re.M))
    assert fills["%rollout"] == fills["%policy_logprobs"] == fills["%policy@1"] \
        == fills["%policy@1g"]
    assert len({fills["%rollout"], fills["%reference_logprobs"], fills["%rm_score"],
                fills["%critic_values"], fills["%advantages"]}) == 5


def test_dot_quotes_are_escaped(plan):
    g = plan.graph
    odd = dataclasses.replace(g, name='we"ird')
    assert plan_dot(dataclasses.replace(plan, graph=odd)).startswith('digraph "we\\"ird" {')


# -- timeline dumps -----------------------------------------------------------------------

def test_merge_rows_and_kinds(plan):
    events, _ = simulate(plan)
    rows, hidden = merge_rows(events)
    assert hidden == 0
    assert [r.label for r in rows][-1] == "host"
    kinds = {event_kind(e) for e in events}
    assert kinds == {"call", "op", "send", "recv", "reshard", "offload"}
    two, hidden = merge_rows(events, max_rows=2)
    assert len(two) == 2 and hidden >= 1
    same = [Event("%a", "m.forward", "m", f"gpu{g}", 0.0, 1.0) for g in range(8)]
    assert [r.label for r in merge_rows(same)[0]] == ["gpu0-7"]
    # 64 GPUs whose reshard parts all differ: merged on their sequence of calls
    many = [Event(n, c, m, f"gpu{g}", s + (0.01 * g if c.startswith("reshard") else 0),
                  t + (0.01 * g if c.startswith("reshard") else 0))
            for g in range(64) for n, c, m, s, t in
            (("%r", "policy.generate", "policy", 0, 2), ("%w", "reshard[policy]", "policy",
                                                          2, 2.5))]
    many.append(Event("%o", "offload", "reference", "gpu3", 2.7, 2.9))
    rows, hidden = merge_rows(many)
    assert [r.label for r in rows] == ["gpu0-2,4-63", "gpu3"] and hidden == 0
    assert [(e.call, e.start, e.end) for e in rows[0].events] == [
        ("policy.generate", 0, 2), ("reshard[policy]", 2, 2.5 + 0.63)]
    assert merged_label(["gpu0", "gpu1", "gpu8", "gpu9"]) == "gpu0-1,8-9"
    assert merged_label([f"rank{r}" for r in range(0, 70, 3)]) == "rank0,3..69"
    assert merged_label([f"r{r}" for r in range(0, 70) if r % 3 and r % 5]) == "r[37 of 1-68]"
    assert merged_label(["local", "gpu0"]) == "local,gpu0"


def test_gantt_png_svg(plan, tmp_path):
    paths = gantt(plan, tmp_path / "g.png", tmp_path / "g.svg")
    assert paths == [tmp_path / "g.png", tmp_path / "g.svg"]
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "g.svg").read_text()
    assert "<svg" in svg and "policy.generate" in svg
    # measured events: any worker names, rows merged by identical timelines
    measured = [Event("%rollout", "policy.generate", "policy", f"rank{r}", 0.0, 1.0)
                for r in range(40)] + [Event("%adv", "gae", "", "local", 1.0, 1.2)]
    out = gantt(plan, tmp_path / "m.png", events=measured)
    assert out == [tmp_path / "m.png"] and (tmp_path / "m.png").stat().st_size > 1000


def test_write_dumps(plan, tmp_path):
    paths = write_dumps(plan, tmp_path / "dump")
    assert [p.name for p in paths] == ["plan.txt", "plan.json", "plan.dot", "trace.json",
                                       "gantt.png", "gantt.svg"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert (tmp_path / "dump/plan.txt").read_text() == plan_text(plan)
    assert Plan.from_json((tmp_path / "dump/plan.json").read_text()) == plan
    trace = json.loads((tmp_path / "dump/trace.json").read_text())
    assert trace["otherData"]["source"] == "predicted"
    events, _ = simulate(plan)
    assert trace == json.loads(json.dumps(chrome_trace(events, "predicted")))
    assert trace["traceEvents"] and all(e["ph"] == "X" for e in trace["traceEvents"])
    again = write_dumps(plan, tmp_path / "again")  # byte for byte, images included
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_import_graphrl_stays_light():
    import subprocess

    code = ("import sys, graphrl, graphrl.dump; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
