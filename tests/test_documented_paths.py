"""What the documentation tells a user to run works in a clone of the repository alone:
no command or default points outside it (the calibration measurements ship in
benchmarks/data/calibration/), and the documented refit command runs from the root."""
from __future__ import annotations

import re

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "benchmarks").rglob("*.md"))]
SOURCES = sorted(p for d in ("graphrl", "passes", "backends", "benchmarks", "examples")
                 for p in (ROOT / d).rglob("*.py"))
CALIBRATE = re.compile(r"python -m graphrl\.calibrate ([^\n]*)")


def calibrate_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every `python -m graphrl.calibrate FILE ...` command in the
    documentation and the sources' docstrings and comments (placeholders left out)."""
    out = []
    for path in DOCS + SOURCES:
        text = re.sub(r"\\\n[\s#]*", " ", path.read_text(encoding="utf-8"))  # joined lines
        for m in CALIBRATE.finditer(text):
            args = [a.strip("`'\"),") for a in m.group(1).split()]
            if args and args[0].endswith(".jsonl") and "FILE" not in args[0]:
                out.append((str(path.relative_to(ROOT)), args))
    return out


def test_nothing_points_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}:{i}" for p in DOCS + SOURCES
               for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               if "../shared" in line or "shared/calibration" in line]
    assert not outside, f"paths outside the repository: {outside}"


def test_documented_calibration_commands_run_from_the_root(monkeypatch, capsys):
    from graphrl.calibrate import main

    commands = calibrate_commands()
    where = {w for w, _ in commands}
    assert {"docs/cost_model_check.md", "graphrl/calibrate.py", "graphrl/cost_params.py",
            "benchmarks/data/calibration/README.md"} <= where, where
    monkeypatch.chdir(ROOT)
    for place, args in commands:
        files = [a for a in args if a.endswith(".jsonl")]
        assert "benchmarks/data/calibration/h100_hf_llama.jsonl" in files, place
        missing = [f for f in files if not (ROOT / f).is_file()]
        assert not missing, f"{place}: {missing} not in the repository"
    documented = dict(commands)["docs/cost_model_check.md"]   # the reproduce section
    assert main([*documented, "--no-fit"]) == 0
    assert "worst train" in capsys.readouterr().out


def test_calibrate_without_files_uses_the_repository_copy(tmp_path, monkeypatch, capsys):
    import graphrl.calibrate as calibrate

    monkeypatch.chdir(tmp_path)   # from anywhere: the files are found beside the package
    assert calibrate.main(["--no-fit"]) == 0
    out = capsys.readouterr().out
    assert "llama-1b train 8x1024" in out and "# held out" in out
    monkeypatch.setattr(calibrate, "DEFAULT_CHECK", (tmp_path / "gone.jsonl",))
    assert calibrate.main(["--no-fit"]) == 2
    err = capsys.readouterr().err
    assert "gone.jsonl" in err and "give the files to fit" in err
