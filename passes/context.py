"""PassContext: what every pass of one compile shares (a leaf module: passes import it,
it imports no pass).

It holds the compile's inputs — the cluster, options, the user's pins — and instruments
(timings, progress, dumps). It carries no results from one pass to the next: a pass
reads only the graph it is given, and everything a later pass needs is in the graph it
returns (graphrl/schedule.py). `search` keeps the placement search's problem and chosen
evaluation, `stream` price-stream's choice, for reports (`graphrl compile`'s table and
async line, benchmarks); no pass reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from graphrl.cluster import ClusterSpec
from graphrl.cost import CALIBRATED, CostParams
from graphrl.lengths import LengthDist

from .search import DEFAULT_HEADROOM, Evaluation, Pin, Problem


@dataclass(frozen=True)
class SearchResult:
    """The placement search behind a placed graph, for reports."""

    problem: Problem
    evaluation: Evaluation


@dataclass
class PassContext:
    """The compile's inputs and instruments. Not frozen: the pipeline appends timings,
    and assign-devices records its search for reports."""

    cluster: ClusterSpec
    gen_engine: str = "hf"
    params: CostParams = CALIBRATED
    pins: Mapping[str, Pin] = field(default_factory=dict)
    check: bool = True
    dump_dir: Path | None = None
    lengths: LengthDist | None = None   # response lengths; None = all max_new_tokens
    headroom: float = DEFAULT_HEADROOM  # share of GPU / host memory plans leave free
    timings: list[tuple[str, float]] = field(default_factory=list)
    progress: Callable[[str, int], None] | None = None   # (stage, evaluations) sink
    engines: bool = False        # lower refuses a strategy no engine of graphrl runs
    rest: tuple[Any, ...] = ()   # the passes after the running one (the pipeline sets it)
    ranking: bool = False        # a scratch run ranking the search's finalists
    search: SearchResult | None = None
    stream: Any = None           # price-stream's report (passes/price_stream.py), for reports

    def scratch(self) -> "PassContext":
        """A context for ranking finalists: the same inputs, no checks, dumps or
        progress, nothing recorded here."""
        return PassContext(self.cluster, self.gen_engine, self.params, self.pins,
                           check=False, lengths=self.lengths, headroom=self.headroom,
                           ranking=True)


__all__ = ["PassContext", "SearchResult"]
