"""The Gantt chart's memory track: each GPU's predicted bytes over the step, the same
accounting verify_plan checks, drawn under the timeline and written atomically."""
from __future__ import annotations

import pytest

import graphrl as gr
from conftest import load_build
from graphrl.cluster import ClusterSpec
from graphrl.compiler import compile_graph
from graphrl.dump import gantt, memory_tracks
from graphrl.memory_track import memory_timeline, memory_uses


@pytest.fixture(scope="module")
def offloading_plan():
    """Four 13B models colocated on 8 H100s: their states do not fit together, so each
    call onloads its model and offloads it after."""
    opts = gr.RunOptions(model_size="13b", prompt_len=512, response_len=512, batch_size=256)
    graph = load_build("ppo")(opts).program().graph
    return compile_graph(graph, ClusterSpec.parse("1x8xH100"), "colocate-all",
                         gen_engine="graph").plan


def test_memory_timeline_follows_the_calls_and_offloads(offloading_plan):
    plan = offloading_plan
    assert any(i.op == "offload" for _, i in plan.instrs())
    timeline = memory_timeline(plan)
    assert sorted(timeline) == list(range(8))
    capacity = plan.cluster.gpu.memory_bytes
    peaks: dict[int, int] = {}
    for use in memory_uses(plan):
        if use.instr.op == "run":
            peaks[use.worker] = max(peaks.get(use.worker, 0), use.in_use)
    for gpu, points in timeline.items():
        times = [t for t, _ in points]
        assert times[0] == 0.0 and times == sorted(times)
        assert times[-1] == pytest.approx(plan.predicted_step_seconds)
        values = [b for _, b in points]
        assert max(values) == peaks[gpu] <= capacity
        assert min(values) < max(values) / 2   # states leave the GPU between calls


def test_gantt_draws_the_memory_track_atomically(offloading_plan, tmp_path):
    plan = offloading_plan
    tracks = memory_tracks(plan)
    assert tracks and tracks[0].label.startswith("gpu")
    paths = gantt(plan, tmp_path / "g.png", tmp_path / "g.svg")
    svg = paths[1].read_text()
    assert "memory per GPU" in svg and "capacity" in svg and "peak" in svg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g.svg"]   # no temp files
