"""The README's example step is real code: it traces and verifies."""
from __future__ import annotations

import re


def test_readme_step_traces(root, capsys):
    text = (root / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "graph @ppo_step {" in out and "carry %critic@0 <- %critic@1" in out
