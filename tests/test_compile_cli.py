"""`graphrl compile`, `graphrl compare` and `graphrl show plan.json`: tables, dumps, JSON,
and one-line errors for a bad cluster or placement file."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from graphrl.cli import main
from graphrl.cli.compile import POLICY_NAMES
from graphrl.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
PPO = str(ROOT / "examples" / "ppo.py")
PLANNING = ["--model-size", "7b", "--prompt-len", "1024", "--response-len", "1024",
            "--batch-size", "256"]
DUMPS = ("000_traced.txt", "001_assign-devices.txt", "002_choose-overlap.txt",
         "003_insert-reshard.txt", "004_price-stream.txt", "005_lower.txt", "plan.txt", "plan.json", "plan.dot", "trace.json",
         "gantt.png", "gantt.svg")


def error_line(err: str) -> str:
    """The one `graphrl: error:` line (argparse's usage line may precede it)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("graphrl: error:")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == lines[0], err   # nothing after it
    return lines[0]


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    """One `graphrl compile ... --dump DIR` for the tests below: (stdout, DIR)."""
    out_dir = tmp_path_factory.mktemp("compile") / "dump"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compile", PPO, "--cluster", "2x8xH100", *PLANNING, "--dump", str(out_dir)])
    assert rc == 0
    return buf.getvalue(), out_dir


def test_compile_prints_a_table_and_the_predicted_step(dumped):
    out, _ = dumped
    assert out.startswith("graphrl compile: @ppo_step on 2x8xH100-80G, policy auto\n")
    table = out.splitlines()[1:]
    assert table[0].split() == ["call", "mesh", "strategy", "start", "s", "seconds", "peak",
                                "GiB"]
    rows = {ln.split()[0]: ln.split() for ln in table[2:] if ln and not ln.startswith(
        ("predicted", "dumps", "pipeline"))}
    assert set(rows) == {"policy.generate", "policy.forward", "reference.forward",
                         "reward.forward", "critic.forward", "policy.train", "critic.train"}
    for call, cols in rows.items():
        assert re.fullmatch(r"\d+(-\d+)?(,\d+)*", cols[1]), cols   # a mesh
        assert cols[2].startswith("dp="), cols
        assert 0 < float(cols[-1]) <= 80.0, cols                   # fits an H100
    m = re.search(r"^predicted step: (\d+\.\d+) s", out, re.M)
    assert m and float(m.group(1)) > 0


def test_compile_dump_writes_every_file(dumped):
    out, d = dumped
    assert sorted(p.name for p in d.iterdir()) == sorted(DUMPS)
    assert f"dumps: {d}/" in out
    assert (d / "000_traced.txt").read_text().startswith("graph @ppo_step {")
    assert "@[" not in (d / "000_traced.txt").read_text()
    assert "@[" in (d / "001_assign-devices.txt").read_text()
    assert "reshard[policy]" in (d / "003_insert-reshard.txt").read_text()
    plan = Plan.from_json((d / "plan.json").read_text())
    assert plan.cluster.text() == "2x8xH100-80G" and plan.policy == "auto"
    assert (d / "plan.txt").read_text().startswith("plan @ppo_step\n")
    assert (d / "plan.dot").read_text().lstrip().startswith("digraph")
    assert json.loads((d / "trace.json").read_text())
    assert (d / "gantt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (d / "gantt.svg").read_text()


def test_show_prints_the_saved_plan(dumped, capsys):
    _, d = dumped
    assert main(["show", str(d / "plan.json")]) == 0
    assert capsys.readouterr().out == (d / "plan.txt").read_text()


def test_show_rejects_a_json_that_is_no_plan(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something-else"}')
    assert main(["show", str(bad)]) == 2
    assert "is not a graphrl plan" in error_line(capsys.readouterr().err)


def test_compare_json_lists_every_policy(capsys):
    assert main(["compare", PPO, "--cluster", "2x8xH100", *PLANNING, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and [r["policy"] for r in rows] == list(POLICY_NAMES)
    for r in rows:
        assert {"policy", "feasible", "step_seconds"} <= set(r)
        assert r["feasible"] == (r["step_seconds"] is not None)
    auto = rows[0]
    assert auto["feasible"] and auto["step_seconds"] > 0
    for r in rows[1:]:
        if r["feasible"]:
            assert auto["step_seconds"] <= r["step_seconds"] * 1.10   # plans, within 10%


def test_bad_cluster_is_one_line_listing_the_presets(capsys):
    assert main(["compile", PPO, "--cluster", "4x8xV999", *PLANNING]) == 2
    line = error_line(capsys.readouterr().err)
    assert "V999" in line
    for preset in ("A100-80G", "H100-80G", "H200", "cpu"):
        assert preset in line


@pytest.mark.parametrize("content, expected", [
    (None, "placement.yaml: No such file or directory"),
    ("policy.train: {gpus: [0, 1\n", "placement.yaml: not YAML or JSON at line 2"),
    ("- policy.train\n", "placement.yaml: expected a mapping of call -> placement"),
    ("policy.sample: {gpus: 0-3}\n", "placement 'policy.sample': no such call"),
    ('{"policy.train": {"gpus": "0-3", "tp": "four"}}',
     "policy.train: tp must be an integer, got a str"),
])
def test_bad_placement_file_is_a_clear_error(tmp_path, capsys, content, expected):
    path = tmp_path / "placement.yaml"
    if content is not None:
        path.write_text(content)
    rc = main(["compile", PPO, "--cluster", "1x8xH100", *PLANNING, "--placement", str(path)])
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line, line


def test_placement_file_pins_show_in_the_table(tmp_path, capsys):
    path = tmp_path / "placement.yaml"
    path.write_text('policy.train: {gpus: "0-7", dp: 8, zero: 3}\n')
    assert main(["compile", PPO, "--cluster", "2x8xH100", *PLANNING,
                 "--placement", str(path)]) == 0
    row = next(ln.split() for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("policy.train "))
    assert row[1] == "0-7" and row[2].startswith("dp=8,tp=1,pp=1") and "zero=3" in row[2]


def test_infeasible_compile_is_a_usage_error(capsys):
    rc = main(["compile", PPO, "--cluster", "1x8xA100", "--model-size", "70b",
               "--prompt-len", "256", "--response-len", "256", "--batch-size", "64"])
    assert rc == 2
    line = error_line(capsys.readouterr().err)
    # the trainers fit by offloading their optimizers, which overflows the node's RAM
    assert "node 0's host RAM: offloaded state needs" in line and "GiB" in line
    assert "the smallest cluster that fits: 2x8xA100-80G" in line


def test_long_compiles_report_progress_and_short_ones_stay_silent():
    from conftest import load_build
    from graphrl.cluster import ClusterSpec
    from graphrl.compiler import compile_graph
    from graphrl.experiment import RunOptions
    from graphrl.progress import Progress

    graph = load_build("ppo")(RunOptions(model_size="7b")).program().graph
    cluster = ClusterSpec.parse("4x8xh100")
    ticks = iter(range(10**6))   # a clock one second per reading: every report prints
    out = io.StringIO()
    progress = Progress("graphrl compile", stream=out, after_s=2, every_s=0,
                        clock=lambda: float(next(ticks)))
    compile_graph(graph, cluster, "auto", progress=progress)
    progress.done()
    lines = out.getvalue().splitlines()
    counts = [int(m.group(1).replace(",", "")) for m in
              (re.search(r"assign-devices: ([\d,]+) placements evaluated", s) for s in lines)
              if m]
    assert counts and counts == sorted(counts) and counts[-1] > 10, lines[:5]
    assert any(": lower (" in s for s in lines) and lines[-1].startswith("graphrl compile: done")
    assert all(s.startswith("graphrl compile: ") for s in lines)
    quiet = io.StringIO()   # a real clock: this compile takes well under 60 s
    compile_graph(graph, cluster, "auto", progress=Progress("x", stream=quiet, after_s=60))
    assert quiet.getvalue() == ""
