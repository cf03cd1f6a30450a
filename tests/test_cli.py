"""The command line: run, show, help, and one-line errors for bad input."""
from __future__ import annotations

import subprocess
import sys

from graphrl.cli import main

EXAMPLE = "examples/ppo.py"


def run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphrl.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_import_graphrl_imports_neither_torch_nor_ray():
    code = ("import sys, graphrl, graphrl.passes, graphrl.backends; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_show_prints_the_graph(root, capsys):
    assert main(["show", str(root / EXAMPLE), "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("graph @ppo_step {")
    assert "call generate[policy](%policy@0, %prompts)" in text
    assert "carry %policy@0 <- %policy@1" in text


def test_run_prints_a_summary(root):
    out = run("run", EXAMPLE, "--iterations", "2", "--batch-size", "4", "--quiet", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "[ppo_step] 2 iterations" in out.stdout and "reward_mean  first 2" in out.stdout


def test_help_explains(root):
    out = run("run", "--help", cwd=root)
    assert out.returncode == 0 and "--metrics FILE" in out.stdout and "--trace" in out.stdout


def test_bad_arguments_are_one_line_usage_errors(root):
    for args, needle in ((["run", EXAMPLE, "--iterations", "zero"], "positive integer"),
                         (["run", EXAMPLE, "--device", "tpu"], "invalid choice"),
                         (["run", "nope.py"], "no such example file"),
                         (["run", EXAMPLE, "--cluster", "1x4xcpu"], "applies to --backend ray"),
                         (["frobnicate"], "invalid choice")):
        out = run(*args, cwd=root)
        assert out.returncode == 2, (args, out.stderr)
        assert needle in out.stderr and "Traceback" not in out.stderr


def test_example_script_takes_the_same_options(root):
    out = subprocess.run([sys.executable, EXAMPLE, "--iterations", "1", "--batch-size", "4",
                          "--quiet"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[ppo_step] 1 iterations" in out.stdout
