"""Smoke test of benchmarks/plan_quality.py: its --quick suite runs, auto is never worse
than any baseline policy on it, and the Markdown report holds the results table."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def plan_quality(root):
    path = root / "benchmarks" / "plan_quality.py"
    spec = importlib.util.spec_from_file_location("plan_quality_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_quick_suite_auto_never_worse_and_report_has_table(plan_quality, tmp_path):
    out = tmp_path / "pq.md"
    results, summary = plan_quality.run(quick=True, out=out, verbose=False)

    assert len(results) == len(plan_quality.quick_suite())
    assert not summary["errors"], summary["errors"]
    assert not summary["auto_worse"], summary["auto_worse"]
    # the placed IR is closed: every plan lowers again from its graph's text, byte for byte
    assert not summary["not_from_text"], summary["not_from_text"]
    assert summary["from_text"][0] == summary["from_text"][1] >= len(results)
    for r in results:
        assert r.auto.status == "ok", (r.case.name, r.auto.error)
        for b in plan_quality.BASELINES:
            other = r.results[b]
            if other.status == "ok":
                assert r.auto.step_seconds <= other.step_seconds * (1 + plan_quality.TIE), \
                    (r.case.name, b, r.auto.step_seconds, other.step_seconds)
                assert r.speedup(b) >= 1 - plan_quality.TIE
        assert r.auto.compile_wall > 0
        # the lower bound holds for every policy's placement (in the search's own model)
        assert r.bound is not None and 0 < r.bound <= r.auto.search_seconds * (1 + 1e-9)
        for b in plan_quality.BASELINES:
            if r.results[b].status == "ok":
                assert r.bound <= r.results[b].search_seconds * (1 + 1e-9), (r.case.name, b)
    assert summary["ceiling"] >= summary["per_baseline"]["colocate-all"]["geomean"] * 0.99

    text = out.read_text()
    header = "| case | " + " | ".join(f"{p} s" for p in plan_quality.POLICY_NAMES)
    assert header in text
    for r in results:
        assert f"| {r.case.name} | " in text
    assert "## Summary" in text and "auto is never worse than any policy" in text
    assert "python benchmarks/plan_quality.py --quick" in text
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_help(root):
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "plan_quality.py"),
                          "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--out" in out.stdout
