"""The core (graphrl/, passes/, backends/) never imports a command-line module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = {"cli", "compile_cli", "estimate", "check_model_cli"}


def _imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.rsplit(".", 1)[-1])
        elif isinstance(node, ast.Import):
            names.update(a.name.rsplit(".", 1)[-1] for a in node.names)
    return names


def test_no_core_module_imports_a_cli_module():
    offenders = []
    for package in ("graphrl", "passes", "backends"):
        for f in sorted((ROOT / package).rglob("*.py")):
            if package == "graphrl" and f.stem in CLI_MODULES:
                continue
            bad = _imported(ast.parse(f.read_text())) & CLI_MODULES
            if bad:
                offenders.append(f"{f.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, offenders
