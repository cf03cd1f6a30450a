"""`graphrl run --backend ray`: compile the step for the cluster, start or join Ray, and
start a RayExecutor on the plan. Driver side: it joins the compiler (graphrl.compiler)
and the Ray backend (graphrl.backends.ray), which never import each other.

Without --address a local cluster is started with the plan's GPU count (fake GPUs on a
machine without any) and shut down when the executor closes; the ranks then meet on
127.0.0.1 over the loopback interface. With --address the ranks meet at rank 0's node
address and Ray stays up. In a process where Ray is already initialised (tests, a
notebook) that session is used and left running.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, TextIO

from .errors import ExecutionError
from .experiment import RunOptions

DEFAULT_CLUSTER = "1x4xcpu"


def compile_for(program: Any, opts: RunOptions) -> Any:
    from .compiler import compile_graph
    from .placement_file import cluster_of, load_placement
    from .progress import Progress

    progress = None if opts.quiet else Progress("graphrl run: compiling")
    compiled = compile_graph(program.graph, cluster_of(opts.cluster or DEFAULT_CLUSTER),
                             opts.policy or "auto", placement=load_placement(opts.placement),
                             gen_engine=gen_class(program.graph),
                             engines=True,   # refuse what no engine runs
                             progress=progress)
    if progress is not None:
        progress.done()
    from .backends.engines.hf_checkpoint import check_checkpoints

    check_checkpoints(program.models, compiled.graph)   # weights agree with config.json
    return compiled


# One wait on a worker may take WAIT_FACTOR x the plan's longest predicted instruction, and
# never less than WAIT_FLOOR_S (start-up, first-call compilation, a slow shared machine).
WAIT_FLOOR_S = 120.0
WAIT_FACTOR = 10.0


def wait_deadline(plan: Any, requested: Optional[float] = None) -> float:
    """Seconds one wait of the executor may take: --call-timeout when given, else derived
    from the plan's predicted instruction times, so a 100 s train call is not cut off."""
    if requested is not None:
        return float(requested)
    longest = max((i.seconds for s in plan.streams for i in s.instrs), default=0.0)
    return max(WAIT_FLOOR_S, WAIT_FACTOR * longest)


def gen_class(graph: Any) -> str:
    """The generation cost class the plan assumes: "graph" when every generating model
    is declared engine="fast", else "hf"."""
    from .cost import generation_class

    gens = {n.model for n in graph.nodes if getattr(n, "target", "") == "generate"}
    classes = {generation_class(m.engine) for m in graph.models if m.name in gens}
    return "graph" if classes == {"graph"} else "hf"


def start_executor(program: Any, opts: RunOptions, out: Optional[TextIO] = None,
                   **kw: Any) -> Any:
    """A RayExecutor running `program` as compiled for `opts`; it owns the Ray session it
    had to start (closing the executor shuts it down)."""
    import ray

    from .backends.ray.cluster import start_ray
    from .backends.ray.executor import RayExecutor

    if opts.address and not ray.is_initialized():
        from .backends.ray.address import check_address

        check_address(opts.address)
    compiled = compile_for(program, opts)
    plan = compiled.plan
    if any(m.lora is not None or m.shares_base for m in program.models.values()):
        from .backends.ray.assign import refuse_lora_engines   # before Ray starts
        from .engines import resolve_engines

        refuse_lora_engines(plan.graph, resolve_engines(
            plan.graph, {name: m.engine for name, m in program.models.items()}))
    if out is not None:
        print(f"[ray] @{plan.graph.name} compiled for {plan.cluster.text()} (policy "
              f"{opts.policy or 'auto'}): predicted {plan.predicted_step_seconds:.3f} s "
              "per step", file=out)
        note = device_note(plan.cluster, opts.device)
        if note:
            print(f"[ray] note: {note}", file=out)
    session = None
    if not ray.is_initialized():
        try:
            session = (start_ray(address=opts.address) if opts.address
                       else start_ray(num_gpus=plan.cluster.num_gpus))
        except (OSError, ConnectionError, RuntimeError, ValueError) as e:
            where = f"join Ray at {opts.address}" if opts.address else "start Ray"
            raise ExecutionError(f"could not {where}: {type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0]}") from e
    local = opts.address is None
    env = {"GLOO_SOCKET_IFNAME": "lo"} if local and sys.platform.startswith("linux") else {}
    env.update({k: v for k, v in os.environ.items() if k.startswith("GRAPHRL_TEST_")})
    kw.setdefault("timeout_s", wait_deadline(plan, opts.call_timeout))
    return RayExecutor(program, plan, seed=opts.seed, device=opts.device, session=session,
                       store_host="127.0.0.1" if local else None, env=env, **kw)


def device_note(cluster: Any, device: str) -> str:
    """What a run should say when its plan is priced for GPUs it does not use (e.g. an
    H100 plan on CPU-only Ray actors): measured times are not the plan's."""
    if device == "cpu" and cluster.gpu.name != "cpu":
        return (f"the plan is priced for {cluster.gpu.name} GPUs ({cluster.text()}), but the "
                "models run on CPU here (--device cpu): measured seconds are CPU seconds, not "
                "comparable with its prediction")
    return ""


__all__ = ["device_note", "start_executor", "compile_for", "wait_deadline", "DEFAULT_CLUSTER"]
