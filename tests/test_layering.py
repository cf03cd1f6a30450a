"""The layering of graphrl's packages (docs/architecture.md, "Layers"), checked on the
import graph read from the AST of every module: module-level and function-level imports,
relative imports resolved, imports under `if TYPE_CHECKING:` left out (they never run).
Importing `a.b.c` also runs the `__init__` of `a` and `a.b`; those implicit edges are not
counted (every module would then depend on `graphrl/__init__.py`).

Layers and what each may import (besides itself):
- core      graphrl/ modules not named below             -> core
- passes    graphrl.passes (passes/)                      -> core
- backends  graphrl.backends (backends/)                  -> core
- driver    DRIVER: compile with the passes and start     -> core, passes, backends
            the executors; and `graphrl` (the public API)
- cli       the command line: graphrl.cli, graphrl.cli.*, graphrl.__main__ and every
            module that imports argparse                  -> everything

And no import cycle among the modules of graphrl/, passes/ and backends/.
"""
from __future__ import annotations

import ast
import configparser
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# graphrl/ modules that plan with the passes or start executors, with what they need
DRIVER = {
    "graphrl.compiler": "runs the pass pipeline and lower",
    "graphrl.lower_placed": "lowers a placed graph's text with the passes",
    "graphrl.async_compile": "staleness rewrite (passes.staleness)",
    "graphrl.async_cost": "prices async splits with passes.search / policies",
    "graphrl.async_report": "says why async lost, from async_cost's pricing",
    "graphrl.placement_file": "pin keys of passes.assign_devices",
    "graphrl.experiment": "Experiment.program: passes.staleness for async runs",
    "graphrl.example_file": "loads an example's Experiment",
    "graphrl.recipes": "tokenizers of the hf engine",
    "graphrl.runner": "runs an Experiment on an executor",
    "graphrl.launch": "compiles, then starts the Ray executor",
}
ALLOWED = {"core": {"core"}, "passes": {"passes", "core"}, "backends": {"backends", "core"},
           "driver": {"driver", "passes", "backends", "core"},
           "cli": {"cli", "driver", "passes", "backends", "core"}}


# -- the import graph ----------------------------------------------------------------------
def package_dirs(root: Path) -> dict[str, Path]:
    """Import name -> directory of every package setup.cfg lists (`packages`), placed as
    its `package_dir` says (a package not named there: in its parent's directory)."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    mapped = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, path = (p.strip() for p in line.partition("="))
        mapped[name] = root / path
    out = {}
    for name in cfg["options"]["packages"].split():
        parent, _, last = name.rpartition(".")
        out[name] = mapped.get(name) or out[parent] / last
    return out


def modules(dirs: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package __init__)."""
    out = {}
    for pkg, d in dirs.items():
        for f in sorted(d.glob("*.py")):
            ispkg = f.stem == "__init__"
            out[pkg if ispkg else f"{pkg}.{f.stem}"] = (f, ispkg)
    return out


def _type_checking(node: ast.AST) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        isinstance(t, ast.Name) and t.id == "TYPE_CHECKING"
        or isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST):
    """Every node, minus the bodies of `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                todo.extend(child.orelse)
            else:
                todo.append(child)


def imported(name: str, ispkg: bool, tree: ast.AST) -> tuple[set[str], set[str]]:
    """(absolute names of what the module imports: modules, or `pkg.attr` for
    `from pkg import attr`; the top-level names of external modules it imports)."""
    names, top = set(), set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if ispkg else name.split(".")[:-1]
                base = ".".join(parts[:len(parts) - node.level + 1]
                                + ([node.module] if node.module else []))
            else:
                base = node.module
            names.update(f"{base}.{a.name}" for a in node.names)
    for n in names:
        top.add(n.split(".")[0])
    return names, top


def import_graph(root: Path = ROOT) -> tuple[nx.DiGraph, set[str]]:
    """(module -> module it imports, the modules that import argparse)."""
    mods = modules(package_dirs(root))
    g, argparse_users = nx.DiGraph(), set()
    g.add_nodes_from(mods)
    for name, (f, ispkg) in mods.items():
        names, top = imported(name, ispkg, ast.parse(f.read_text(), str(f)))
        if "argparse" in top:
            argparse_users.add(name)
        for n in names:
            while n not in mods and "." in n:   # `pkg.attr` -> pkg; `a.b.c` -> known prefix
                n = n.rsplit(".", 1)[0]
            if n in mods and n != name:
                g.add_edge(name, n)
    return g, argparse_users


def layer(module: str, cli: set[str]) -> str:
    if module in cli:
        return "cli"
    if module == "graphrl" or module in DRIVER:
        return "driver"
    for pkg in ("passes", "backends"):
        if module == f"graphrl.{pkg}" or module.startswith(f"graphrl.{pkg}."):
            return pkg
    return "core"


def command_line(g: nx.DiGraph, argparse_users: set[str]) -> set[str]:
    return argparse_users | {m for m in g if m in ("graphrl.cli", "graphrl.__main__")
                             or m.startswith("graphrl.cli.")}


def a_cycle(g: nx.DiGraph, component: set[str]) -> str:
    """One cycle through a strongly connected component, as a path."""
    edges = nx.find_cycle(g.subgraph(component))
    return " -> ".join([a for a, _ in edges] + [edges[0][0]])


# -- the checks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo() -> tuple[nx.DiGraph, set[str]]:
    """(the repository's import graph, its command-line modules)."""
    g, argparse_users = import_graph()
    return g, command_line(g, argparse_users)


def test_the_graph_reader_on_a_made_up_package(tmp_path):
    (tmp_path / "setup.cfg").write_text(
        "[options]\npackage_dir =\n    pkg = src\n    pkg.sub = other\n"
        "packages =\n    pkg\n    pkg.sub\n    pkg.cli\n")
    (tmp_path / "src" / "cli").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    files = {
        "src/__init__.py": "from .a import A\n",
        "src/a.py": "import argparse\nfrom typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from .b import B\nA = 1\n",
        "src/b.py": "def f():\n    from pkg.sub import c\n    from . import a\n",
        "other/__init__.py": "",
        "other/c.py": "from .. import b\nimport pkg.sub.d\nimport os\n",
        "other/d.py": "from pkg.a import A\n",
        "src/cli/__init__.py": "from ..sub import d\n",
    }
    for path, text in files.items():
        (tmp_path / path).write_text(text)
    g, argparse_users = import_graph(tmp_path)
    assert sorted(g.edges) == [("pkg", "pkg.a"), ("pkg.b", "pkg.a"), ("pkg.b", "pkg.sub.c"),
                               ("pkg.cli", "pkg.sub.d"), ("pkg.sub.c", "pkg.b"),
                               ("pkg.sub.c", "pkg.sub.d"), ("pkg.sub.d", "pkg.a")]
    assert argparse_users == {"pkg.a"}
    assert a_cycle(g, {"pkg.b", "pkg.sub.c"}) in ("pkg.b -> pkg.sub.c -> pkg.b",
                                                 "pkg.sub.c -> pkg.b -> pkg.sub.c")


def test_the_repository_graph_is_read_whole(repo):
    g, cli = repo
    files = {f for d in ("graphrl", "passes", "backends") for f in (ROOT / d).rglob("*.py")}
    read = {f for f, _ in modules(package_dirs(ROOT)).values()}
    assert files == read, f"not in setup.cfg's package_dir: {sorted(files - read)}"
    # a function-level import, a relative one in a subpackage, `from pkg import module`
    for edge in [("graphrl.compiler", "graphrl.passes.base"),
                 ("graphrl.backends.ray.runtime", "graphrl.backends.engines.registry"),
                 ("graphrl.backends.ray.runtime", "graphrl.signatures")]:
        assert g.has_edge(*edge), edge
    assert {"graphrl.cli", "graphrl.cli.compile", "graphrl.cli.run_args"} <= cli
    assert not cli & set(DRIVER), "a driver module imports argparse"


def test_every_driver_module_needs_to_be_one(repo):
    """DRIVER lists only modules that reach passes/ or backends/ (else they are core)."""
    g, cli = repo
    lower = {m for m in g if layer(m, cli) in ("passes", "backends")}
    idle = [m for m in DRIVER if m not in g or not nx.descendants(g, m) & lower]
    assert not idle, f"not driver modules (missing, or import no pass or backend): {idle}"


def test_imports_follow_the_layers(repo):
    g, cli = repo
    bad = [f"{a} ({layer(a, cli)}) imports {b} ({layer(b, cli)})"
           for a, b in sorted(g.edges) if layer(b, cli) not in ALLOWED[layer(a, cli)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(repo):
    g, _ = repo
    cycles = [a_cycle(g, c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles))
