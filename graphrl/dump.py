"""Dumps of a Plan for people and tools: text, JSON, Graphviz DOT, Chrome trace, Gantt.

Every dump is deterministic: names come from the IR (`%rollout`, `w3.5`), never object
ids; floats are printed with fixed precision (`human_seconds`, `human_bytes`); model
colours come from one fixed palette indexed by the sorted model names, so a model has
the same colour in the DOT graph and the Gantt chart, and in every dump of one graph.

    plan_text(plan)               header, placed graph, per-worker streams, clock view
    plan_dot(plan)                the placed graph, nodes clustered by mesh
    gantt(plan, png, svg)         the predicted (or a measured) timeline as a chart, with
                                  the predicted memory per GPU under a predicted one
    write_dumps(plan, out_dir)    all of the above plus plan.json and trace.json

The clock view and the Gantt chart merge workers whose timelines are identical into one
column (row) labelled by GPU range, `gpu0-3`, so a gang of GPUs reads as one mesh.
matplotlib is imported only inside `gantt`, through its object API on the Agg canvas
(no pyplot, no global backend switch).
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from .graph import OP, SYSTEM, Graph, Node
from .parallel import DeviceMesh
from .plan import HOST, Instr, Plan, Stream, worker_name
from .simulate import simulate
from .timeline import Event, write_chrome_trace
from .units import human_bytes, human_seconds

# -- formatters ---------------------------------------------------------------------------


# -- colours ------------------------------------------------------------------------------

# A fixed qualitative palette (no greys: grey is for ops). Index = rank of the model's
# name among the sorted model names of the graph.
PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
           "#CCB974", "#64B5CD", "#2CA02C", "#D62728", "#9467BD")
OP_COLOR = "#B0B0B0"
SYSTEM_KINDS = ("reshard", "offload", "onload", "send", "recv")
_SHORT = {"generate": "gen", "forward": "fwd", "train": "train"}  # bar text when narrow
_HATCH = {"reshard": "///", "offload": "...", "onload": "...", "send": "xxx", "recv": "xxx"}


def model_colors(models: Iterable[str]) -> dict[str, str]:
    """Model name -> hex colour, by the name's rank in sorted order (stable per graph)."""
    names = sorted(set(m for m in models if m))
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(names)}


def _lighten(color: str, amount: float = 0.55) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02X}" for c in mix)


# -- workers and rows ---------------------------------------------------------------------

_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _worker_sort_key(name: str) -> tuple:
    m = _NUMBERED.match(name)
    is_host = name == worker_name(HOST)
    return (is_host, m.group(1), int(m.group(2)), "") if m else (is_host, name, -1, name)


def _compact(nums: Sequence[int]) -> str:
    """`0-3`, `0-3,8-11`, `0,3..69` (a stride), or `[23 of 0-69]` when still long."""
    n = sorted(nums)
    step = n[1] - n[0] if len(n) > 2 else 0
    if step > 1 and all(b - a == step for a, b in zip(n, n[1:])):
        return f"{n[0]},{n[1]}..{n[-1]}"
    runs: list[list[int]] = []
    for x in n:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    text = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return text if len(text) <= 24 else f"[{len(n)} of {n[0]}-{n[-1]}]"


def merged_label(workers: Sequence[str]) -> str:
    """`gpu0-3` for gpu0..gpu3, `gpu0-3,8-11`, `gpu0,2..14` for a stride, else the names
    joined by commas."""
    if len(workers) == 1:
        return workers[0]
    parts = [_NUMBERED.match(w) for w in workers]
    if all(parts) and len({p.group(1) for p in parts}) == 1:  # type: ignore[union-attr]
        nums = [int(p.group(2)) for p in parts]  # type: ignore[union-attr]
        if len(set(nums)) == len(nums):
            return parts[0].group(1) + _compact(nums)  # type: ignore[union-attr]
    return ",".join(workers)


def _by_worker(events: Iterable[Event]) -> dict[str, list[Event]]:
    rows: dict[str, list[Event]] = {}
    for e in events:
        rows.setdefault(e.worker, []).append(e)
    return {w: sorted(rows[w], key=lambda e: (e.start, e.end, e.call))
            for w in sorted(rows, key=_worker_sort_key)}


def _t(x: float) -> float:
    """A time as a grouping key: equal starts computed along different paths agree."""
    return round(x, 9)


@dataclass(frozen=True)
class Row:
    """Workers with one timeline (a Gantt row, a clock-view column)."""

    label: str
    workers: tuple[str, ...]
    events: tuple[Event, ...]


def merge_rows(events: Iterable[Event], max_rows: int = 32) -> tuple[list[Row], int]:
    """Rows of workers whose timelines agree, coarser only as far as needed:

    1. identical event sequences (call, model, start, end);
    2. else, if over `max_rows`, the same calls at the same starts (reshard parts of
       different sizes end at different times): a bar per (call, start), to the last end;
    3. else the same sequence of calls: the k-th call's bar spans the members' earliest
       start to latest end.

    Returns at most `max_rows` rows (by worker order) and how many were left out.
    """
    per_worker = _by_worker(events)

    def at_start(e: Event, k: int) -> tuple:
        return (e.call, e.model, _t(e.start))

    def kth_call(e: Event, k: int) -> tuple:
        return (e.call, e.model, k)

    def group(key_of, bar_of) -> list[Row]:
        groups: dict[tuple, list[str]] = {}
        for w, evs in per_worker.items():
            groups.setdefault(key_of(evs), []).append(w)
        rows = []
        for members in groups.values():
            bars: dict[tuple, Event] = {}
            for w in members:
                for k, e in enumerate(per_worker[w]):
                    key = bar_of(e, k)
                    old = bars.get(key, e)
                    bars[key] = replace(old, start=min(old.start, e.start),
                                        end=max(old.end, e.end))
            rows.append(Row(merged_label(members), tuple(members), tuple(bars.values())))
        return sorted(rows, key=lambda r: _worker_sort_key(r.workers[0]))

    rows = group(lambda evs: tuple((e.call, e.model, _t(e.start), _t(e.end)) for e in evs),
                 at_start)
    if len(rows) > max_rows:
        rows = group(lambda evs: tuple((e.call, e.model, _t(e.start)) for e in evs), at_start)
    if len(rows) > max_rows:
        rows = group(lambda evs: tuple((e.call, e.model) for e in evs), kth_call)
    return rows[:max_rows], max(0, len(rows) - max_rows)


# -- plan text ----------------------------------------------------------------------------


def _instr_line(i: Instr, id_width: int) -> str:
    if i.op in ("run", "reshard"):
        parts = [i.node, i.label or i.op]
    elif i.op == "send":
        parts = [f"{i.value} -> {worker_name(i.peer)}"]
    elif i.op == "recv":
        parts = [f"{i.value} <- {worker_name(i.peer)}"]
    elif i.op in ("offload", "onload"):
        parts = [i.model]
    else:  # free
        parts = [i.value]
    if i.nbytes:
        parts.append(human_bytes(i.nbytes))
    if i.op != "free":
        parts.append(human_seconds(i.seconds))
    if i.mem:
        parts.append(f"mem={human_bytes(i.mem)}")
    if i.deps:
        parts.append(f"deps=[{', '.join(i.deps)}]")
    return f"  {i.id:<{id_width}}  {i.op:<7}  " + "  ".join(parts)


def _stream_lines(s: Stream) -> list[str]:
    width = max((len(i.id) for i in s.instrs), default=0)
    n = len(s.instrs)
    lines = [f"stream {worker_name(s.worker)}  ({n} instruction{'s' if n != 1 else ''})"]
    lines += [_instr_line(i, width) for i in s.instrs]
    return lines


def _resident_lines(plan: Plan) -> list[str]:
    per_gpu: dict[int, list[tuple[str, int]]] = {}
    for gpu, unit, nbytes in plan.resident:
        per_gpu.setdefault(gpu, []).append((unit, nbytes))
    groups: dict[tuple, list[int]] = {}
    for gpu in sorted(per_gpu):
        groups.setdefault(tuple(sorted(per_gpu[gpu])), []).append(gpu)
    return [f"  w{DeviceMesh(tuple(gpus)).text()}: "
            + ", ".join(f"{m} {human_bytes(b)}" for m, b in models)
            for models, gpus in groups.items()]


def _cell_label(e: Event) -> str:
    return f"{e.call} {e.node}" if e.call in SYSTEM_KINDS and e.node else e.call


def _stamps(times: Sequence[float]):
    """A formatter of times in seconds with the fewest decimals (2 to 6) that keeps
    distinct times distinct (to the microsecond), so clock rows never read the same."""
    distinct = sorted(set(times))
    for d in range(2, 7):
        if len({f"{t:.{d}f}" for t in distinct}) == len(distinct):
            break
    return lambda t: f"{t:.{d}f}s"


def clock_lines(events: Iterable[Event], step_seconds: float) -> list[str]:
    """The clock view: one row per distinct start time (to the microsecond), one column
    per merged worker group; a cell names what starts there (`a+b` if several), `"`
    while something continues, blank when idle."""
    rows, _ = merge_rows(events, max_rows=10 ** 9)
    starts = sorted({_t(e.start) for r in rows for e in r.events})
    stamp = _stamps(starts + [_t(step_seconds)])
    slots: dict[str, float] = {}      # printed time -> the earliest exact start
    for t in starts:
        slots.setdefault(stamp(t), t)
    table = [["time"] + [r.label for r in rows]]
    for text, t in slots.items():
        line = [text]
        for r in rows:
            starting = [_cell_label(e) for e in r.events if stamp(_t(e.start)) == text]
            running = any(_t(e.start) < t < _t(e.end) for e in r.events)
            line.append("+".join(starting) if starting else ('"' if running else ""))
        table.append(line)
    table.append([stamp(_t(step_seconds)), "end"] + [""] * max(0, len(rows) - 1))
    ncols = max(len(row) for row in table)
    widths = [max(len(row[c]) for row in table if c < len(row)) for c in range(ncols)]
    lines = []
    for row in table:
        while len(row) > 1 and not row[-1]:
            row = row[:-1]
        cells = [row[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append(" | ".join(cells).rstrip())
    return lines


def plan_text(plan: Plan) -> str:
    """The canonical text of a plan: header, placed graph, streams, clock view."""
    lines = [f"plan @{plan.graph.name}",
             f"  cluster    {plan.cluster.text()}",
             f"  policy     {plan.policy}",
             f"  predicted  {human_seconds(plan.predicted_step_seconds)} per step",
             f"  workers    {len(plan.streams)} streams, "
             f"{sum(len(s.instrs) for s in plan.streams)} instructions"]
    if plan.resident:
        lines += ["", "resident (bytes per GPU between calls)"] + _resident_lines(plan)
    if plan.notes:
        lines += ["", "notes"] + [f"  {k}: {v}" for k, v in plan.notes]
    lines += ["", "== graph =="] + plan.graph.text().rstrip("\n").split("\n")
    lines += ["", "== streams =="]
    for s in plan.streams:
        lines += _stream_lines(s)
    lines += [""]
    try:
        events, step = simulate(plan)
    except ValueError as e:  # a deadlocked plan still prints, with the cycle
        lines += ["== clock ==", f"  no timeline: {e}"]
    else:
        lines += [f"== clock (simulated step {human_seconds(step)}) =="]
        lines += clock_lines(events, step)
    return "\n".join(lines) + "\n"


# -- DOT ----------------------------------------------------------------------------------


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _label(*parts: str) -> str:
    """A DOT label of several lines (each part escaped, joined by DOT's `\\n`)."""
    return '"' + "\\n".join(p.replace("\\", "\\\\").replace('"', '\\"') for p in parts) + '"'


def _node_stmt(n: Node, colors: dict[str, str]) -> str:
    parts = [f"{n.name} = {n.call}"]
    if n.placement is not None:
        parts.append(f"@[{n.placement.mesh.text()}] {n.placement.strategy.text()}")
    if n.group:
        parts.append(f"par={n.group}")
    fill = _lighten(colors[n.model]) if n.model in colors else _lighten(OP_COLOR, 0.4)
    shape = "diamond" if n.kind == SYSTEM else ("ellipse" if n.kind == OP else "box")
    return f"{_q(n.name)} [label={_label(*parts)}, shape={shape}, fillcolor={_q(fill)}];"


def _cluster_key(n: Node) -> tuple[tuple[int, ...], str] | None:
    if n.placement is not None:
        return n.placement.mesh.gpus, f"mesh {n.placement.mesh.text()}"
    if n.kind == OP:
        return (), "host"
    return None


def plan_dot(plan: Plan | Graph) -> str:
    """Graphviz DOT of the placed graph: a node per graph node (call, mesh, strategy),
    system nodes as diamonds, graph inputs as small notes, edges labelled with payload
    bytes, carries dashed, nodes coloured by model, one `cluster_*` per mesh."""
    g = plan.graph if isinstance(plan, Plan) else plan
    colors = model_colors(m.name for m in g.models)
    title = f"@{g.name}" + (f"  policy {plan.policy}" if isinstance(plan, Plan) else "")
    out = [f"digraph {_q(g.name)} {{",
           f"  label={_q(title)}; labelloc=t; rankdir=TB; fontname=Helvetica;",
           '  node [style="rounded,filled", fontname=Helvetica, fontsize=10];',
           "  edge [fontname=Helvetica, fontsize=8];"]
    for v in g.inputs:
        fill = _lighten(colors[v.spec.model], 0.75) if v.spec.model in colors else "#FFFFFF"
        out.append(f"  {_q(v.name)} [label={_label(v.name, v.spec.kind)}, shape=note, "
                   f"style=filled, fillcolor={_q(fill)}, fontsize=8];")
    clusters: dict[tuple[int, ...], tuple[str, list[Node]]] = {}
    loose: list[Node] = []
    for n in g.nodes:
        key = _cluster_key(n)
        if key is None:
            loose.append(n)
        else:
            clusters.setdefault(key[0], (key[1], []))[1].append(n)
    for k, gpus in enumerate(sorted(clusters, key=lambda gp: (gp == (), gp))):
        label, members = clusters[gpus]
        out.append(f"  subgraph cluster_{k} {{")
        out.append(f"    label={_q(label)}; style=dashed; color=\"#808080\";")
        out += [f"    {_node_stmt(n, colors)}" for n in members]
        out.append("  }")
    out += [f"  {_node_stmt(n, colors)}" for n in loose]
    producers = g.producers()
    for n in g.nodes:
        for i in n.inputs:
            src = producers.get(i)
            src_name = src.name if src is not None else i
            v = g.value(i)
            text = human_bytes(v.spec.nbytes)
            if src is not None and len(src.outputs) > 1:
                text = f"{i} {text}"
            out.append(f"  {_q(src_name)} -> {_q(n.name)} [label={_q(text)}];")
    for dst, src in g.carries:
        p = producers.get(src)
        out.append(f"  {_q(p.name if p else src)} -> {_q(dst)} [style=dashed, "
                   f"constraint=false, label={_q('next step')}, color=\"#808080\"];")
    out.append("}")
    return "\n".join(out) + "\n"


# -- Gantt --------------------------------------------------------------------------------


def event_kind(e: Event) -> str:
    """`reshard`, `offload`, `onload`, `send`, `recv`, `op` (no model) or `call`."""
    m = re.match(r"[a-z]+", e.call)
    if m and m.group(0) in SYSTEM_KINDS:
        return m.group(0)
    return "call" if e.model else "op"


def gantt(plan: Plan, path_png: str | Path, path_svg: str | Path | None = None,
          events: Iterable[Event] | None = None, *, source: str | None = None,
          max_rows: int = 32) -> list[Path]:
    """A Gantt chart of the plan's timeline: predicted (`simulate(plan)`) unless measured
    `events` are given. One row per GPU, rows with identical timelines merged (`gpu0-3`),
    at most `max_rows`; bars coloured per model (the DOT palette), system work hatched.
    Writes a PNG (and an SVG when `path_svg` is given); returns the paths written."""
    from matplotlib import rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if events is None:
        evs, step = simulate(plan)
        source = source or "predicted"
    else:
        evs = list(events)
        step = max((e.end for e in evs), default=0.0)
        source = source or "measured"
    rows, hidden = merge_rows(evs, max_rows)
    colors = model_colors([m.name for m in plan.graph.models] + [e.model for e in evs])
    xmax = step if step > 0 else 1.0
    # the memory track is the plan's prediction: drawn under a predicted timeline only
    tracks = memory_tracks(plan) if source == "predicted" else []

    width_in = 13.0
    height = 1.5 + 0.42 * max(1, len(rows))
    fig = Figure(figsize=(width_in, height + (2.4 if tracks else 0.0)))
    FigureCanvasAgg(fig)
    if tracks:
        grid = fig.add_gridspec(2, 1, height_ratios=(height, 2.4), hspace=0.35)
        ax = fig.add_subplot(grid[0])
        _draw_memory(fig.add_subplot(grid[1], sharex=ax), tracks,
                     plan.cluster.gpu.memory_bytes)
    else:
        ax = fig.add_subplot()
    px_per_s = width_in * 110 * 0.78 / xmax   # roughly, for deciding where text fits
    kinds_seen: set[str] = set()
    for y, row in enumerate(rows):
        for e in row.events:
            kind = event_kind(e)
            kinds_seen.add(kind)
            base = colors.get(e.model, OP_COLOR)
            face = _lighten(base, 0.35) if kind in SYSTEM_KINDS else base
            width = max(e.end - e.start, xmax * 0.002)
            ax.barh(y, width, left=e.start, height=0.72, color=face,
                    hatch=_HATCH.get(kind), edgecolor="#303030", linewidth=0.5)
            method = e.call.rpartition(".")[2]
            fits = [t for t in (e.call, method, _SHORT.get(method, ""))
                    if t and width * px_per_s > 6.2 * len(t) + 6]
            if fits:
                text = fits[0]
                box = (dict(facecolor="white", alpha=0.75, edgecolor="none", pad=0.8)
                       if kind in SYSTEM_KINDS else None)
                ax.text(e.start + width / 2, y, text, ha="center", va="center", fontsize=7,
                        clip_on=True, bbox=box)
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, xmax * 1.01)
    ax.set_xlabel("seconds")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    title = f"@{plan.graph.name} · policy {plan.policy} · {source} step {human_seconds(step)}"
    if source != "predicted":
        title += f" (plan predicts {human_seconds(plan.predicted_step_seconds)})"
    if hidden:
        title += f"\nshowing {len(rows)} of {len(rows) + hidden} rows"
    ax.set_title(title, fontsize=10)
    handles = [Patch(facecolor=c, edgecolor="#303030", label=m) for m, c in colors.items()
               if any(e.model == m for e in evs)]
    if "op" in kinds_seen:
        handles.append(Patch(facecolor=OP_COLOR, edgecolor="#303030", label="op (host)"))
    for kind, label in (("reshard", "reshard"), ("offload", "offload / onload"),
                        ("send", "send / recv")):
        if kind in kinds_seen or (kind == "offload" and "onload" in kinds_seen) \
                or (kind == "send" and "recv" in kinds_seen):
            handles.append(Patch(facecolor="#FFFFFF", edgecolor="#303030",
                                 hatch=_HATCH[kind], label=label))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                  fontsize=8, frameon=False)
    from .outputs import atomic_write_bytes

    paths = [Path(path_png)]
    with rc_context({"svg.hashsalt": "graphrl", "hatch.linewidth": 0.6}):
        # rendered in memory, then written through a temporary file and a rename, so a
        # reader never sees half a chart
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(paths[0], buf.getvalue())
        if path_svg is not None:
            paths.append(Path(path_svg))
            buf = io.BytesIO()
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
            atomic_write_bytes(paths[1], buf.getvalue())
    return paths


@dataclass(frozen=True)
class MemoryTrack:
    """GPUs whose predicted memory curves are identical, and that curve (bytes)."""

    label: str
    points: tuple[tuple[float, int], ...]

    @property
    def peak(self) -> int:
        return max(b for _, b in self.points)


def memory_tracks(plan: Plan, max_tracks: int = 8) -> list[MemoryTrack]:
    """The plan's memory per GPU over the predicted step (graphrl.memory_track), GPUs with
    identical curves merged (`gpu0-3`), highest peak first, at most `max_tracks`."""
    from .memory_track import memory_timeline

    groups: dict[tuple, list[int]] = {}
    for gpu, points in sorted(memory_timeline(plan).items()):
        groups.setdefault(tuple(points), []).append(gpu)
    tracks = [MemoryTrack(merged_label([f"gpu{g}" for g in gpus]), points)
              for points, gpus in groups.items()]
    tracks.sort(key=lambda t: (-t.peak, _worker_sort_key(t.label)))
    return tracks[:max_tracks]


def _draw_memory(ax, tracks: Sequence[MemoryTrack], capacity: int) -> None:
    """Memory per GPU (GiB) as step lines under the timeline, and the GPU's capacity."""
    gib = 2 ** 30
    for k, t in enumerate(tracks):
        xs = [p[0] for p in t.points]
        ys = [p[1] / gib for p in t.points]
        ax.step(xs, ys, where="post", color=PALETTE[k % len(PALETTE)], linewidth=1.2,
                label=f"{t.label} (peak {human_bytes(t.peak)})")
    ax.axhline(capacity / gib, color="#C44E52", linestyle="--", linewidth=0.9,
               label=f"capacity {human_bytes(capacity)}")
    ax.set_ylim(0, capacity / gib * 1.08)
    ax.set_ylabel("GiB per GPU", fontsize=8)
    ax.set_xlabel("seconds")
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("memory per GPU (predicted)", fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)


# -- all dumps ----------------------------------------------------------------------------


def write_dumps(plan: Plan, out_dir: str | Path) -> list[Path]:
    """Write plan.txt, plan.json, plan.dot, trace.json (predicted Chrome trace),
    gantt.png and gantt.svg into `out_dir`; return their paths in that order. A
    deadlocked plan still gets its text, JSON and DOT before the ValueError."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "plan.txt", out / "plan.json", out / "plan.dot"]
    from .outputs import atomic_write_text

    atomic_write_text(paths[0], plan_text(plan))
    atomic_write_text(paths[1], plan.to_json())
    atomic_write_text(paths[2], plan_dot(plan))
    try:
        events, _ = simulate(plan)
    except ValueError as e:
        raise ValueError(f"{e} (wrote {', '.join(str(p) for p in paths)})") from e
    paths.append(out / "trace.json")
    write_chrome_trace(paths[-1], events, "predicted")
    paths += gantt(plan, out / "gantt.png", out / "gantt.svg", events=events,
                   source="predicted")
    return paths


__all__ = ["human_bytes", "human_seconds", "model_colors", "PALETTE", "OP_COLOR", "Row",
           "merge_rows", "merged_label", "clock_lines", "plan_text", "plan_dot", "event_kind",
           "gantt", "write_dumps", "MemoryTrack", "memory_tracks"]
