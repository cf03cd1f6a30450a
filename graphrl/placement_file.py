"""What compiling needs from the user besides the graph: the placement policy names, the
cluster text (`--cluster NxGxTYPE`), the placement file pinning calls, and the generation
engine the cost model assumes. Core code (backends, experiment) takes these from here;
the command-line modules only add their flags around them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

POLICY_NAMES = ("auto", "colocate-all", "split", "hybridflow")


def load_placement(path: str | None) -> dict[str, Any]:
    """The placement file at `path` (YAML or JSON) as a mapping call -> pin; {} for none."""
    if not path:
        return {}
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--placement {path}: {e.strerror}") from None
    except yaml.YAMLError as e:  # one line: where, and what the parser expected
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"--placement {path}: not YAML or JSON{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--placement {path}: expected a mapping of call -> placement")
    return data


def cluster_of(text: str) -> Any:
    """`--cluster NxGxTYPE` -> ClusterSpec, with a one-line error."""
    from .cluster import ClusterSpec

    try:
        return ClusterSpec.parse(text)
    except ValueError as e:
        raise UsageError(f"--cluster: {e}") from None


def gen_engine(requested: str | None, planning: bool) -> str:
    """The generation engine the cost model assumes: the one asked for, else graph
    (CUDA-graph class) for full-size planning, else hf (what runs here)."""
    return requested or ("graph" if planning else "hf")
