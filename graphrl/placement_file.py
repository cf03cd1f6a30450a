"""What compiling needs from the user besides the graph: the placement policy names, the
cluster text (`--cluster NxGxTYPE`), the placement file pinning calls, and the generation
engine the cost model assumes. Core code (backends, experiment) takes these from here;
the command-line modules only add their flags around them."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import UsageError
from .nearest import suggest

POLICY_NAMES = ("auto", "colocate-all", "split", "hybridflow")
# The largest cluster compile accepts: PPO on 128x8xH100 with 70B models compiles in ~3.5 s
# on one CPU core, 1000x8 in ~50 s (growing with the cluster), so larger is refused at once.
MAX_GPUS = 1024


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
    from .passes.assign_devices import PIN_KEYS

    for call, entry in data.items():
        check_pin(PIN_KEYS, f"--placement {path}", call, entry)
    return data


# Pin keys and the smallest value each takes (gpus: a mesh, checked against the cluster
# by passes.assign_devices.parse_pins).
PIN_MINIMUM = {"tp": 1, "pp": 1, "dp": 1, "zero": 0, "micro_batches": 1, "recompute": 0,
               "offload": 0}
ZERO_STAGES = (0, 1, 2, 3)
_CALL_NAME = re.compile(r"[A-Za-z_][\w-]*\.[A-Za-z_]\w*\Z")
_SHORT_KEY = re.compile(r"[A-Za-z_]\w{0,15}\Z")   # echoed in errors; longer text is not


def _kind(v: Any) -> str:
    """What a value is, without echoing the file's text (only short numbers are shown)."""
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)) and len(repr(v)) <= 12:
        return f"{v!r}"
    return f"a {type(v).__name__}"


def check_pin(known: tuple[str, ...], where: str, call: Any, entry: Any) -> None:
    """One placement entry `call: {gpus: ..., dp: ..., ...}`: keys known (with the nearest
    name suggested), numbers integers in range (2.7 and true are refused, not truncated)."""
    if not isinstance(call, str) or not _CALL_NAME.match(call) or len(call) > 80:
        raise UsageError(f"{where}: an entry's name is not a call (MODEL.METHOD, e.g. "
                         "policy.train)")
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: {call}: expected a mapping of {', '.join(known)}, "
                         f"got {_kind(entry)}")
    for i, (key, value) in enumerate(entry.items()):
        if key not in known:
            hint = suggest(key, known) if isinstance(key, str) and len(key) < 40 else ""
            short = isinstance(key, str) and _SHORT_KEY.match(key)
            shown = (repr(key) if hint or short else
                     f"number {i + 1} of the entry (not shown: not a short name)")
            raise UsageError(f"{where}: {call}: unknown key {shown}{hint} "
                             f"(known: {', '.join(known)})")
        if key == "gpus":
            ok = (isinstance(value, str) and len(value) < 200) or (
                isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
                isinstance(value, list) and value and all(
                    isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value))
            if not ok:
                raise UsageError(f"{where}: {call}: gpus must be a range like \"0-3\", a GPU "
                                 f"index or a list of indices, got {_kind(value)}")
            continue
        if key not in PIN_MINIMUM:  # a non-numeric key: parse_pins checks it
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{where}: {call}: {key} must be an integer, got {_kind(value)}")
        if value < PIN_MINIMUM[key] or (key == "zero" and value not in ZERO_STAGES):
            allowed = "0, 1, 2 or 3" if key == "zero" else f">= {PIN_MINIMUM[key]}"
            raise UsageError(f"{where}: {call}: {key} must be {allowed}, got {value}")


def cluster_of(text: str) -> Any:
    """`--cluster NxGxTYPE` -> ClusterSpec, with a one-line error."""
    from .cluster import ClusterSpec

    try:
        cluster = ClusterSpec.parse(text)
    except ValueError as e:
        raise UsageError(f"--cluster: {e}") from None
    if cluster.num_gpus > MAX_GPUS:
        raise UsageError(f"--cluster {text}: {cluster.num_gpus} GPUs is beyond the "
                         f"{MAX_GPUS} graphrl plans for (the placement search grows with "
                         "the cluster; 1024 GPUs compile in a few seconds)")
    return cluster


def gen_engine(requested: str | None, planning: bool) -> str:
    """The generation engine the cost model assumes: the one asked for, else graph
    (CUDA-graph class) for full-size planning, else hf (what runs here)."""
    return requested or ("graph" if planning else "hf")
