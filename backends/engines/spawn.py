"""Run a function on several local processes joined by torch.distributed (gloo on CPU):
how multi-rank engines (megatron tp/pp, DeepSpeed ZeRO) are checked on one machine
(`graphrl check-model`, the engines' differential tests).

`spawn` starts the ranks on a free local port and waits with a deadline: a rank that
raises, dies or hangs past it ends every rank and raises one error naming `what`. With
`preload` the ranks are forked from multiprocessing's fork server, which imports those
modules once for the calling process (megatron-core's import alone costs seconds a rank).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Sequence

from graphrl.errors import ExecutionError


# What the ranks of the multi-rank engines import, for spawn's `preload`: megatron-core
# (seconds a rank: it imports wandb and torch's inductor) and transformers. Not deepspeed:
# it picks its accelerator when imported, before init_rank sets DS_ACCELERATOR=cpu.
ENGINE_MODULES = ("megatron.core", "transformers")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world: int, port: int) -> None:
    """Join the gloo process group of `world` local ranks on `port` (one torch thread per
    rank: the ranks share the machine's cores)."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn(worker: Callable[..., Any], args: tuple, world: int, timeout_s: float,
          what: str, preload: Sequence[str] = ()) -> None:
    """Run worker(rank, world, port, *args) on `world` spawned processes and wait for all
    of them, at most `timeout_s` seconds. ExecutionError naming `what` when a rank raises,
    exits non-zero or is still running at the deadline (every rank is then killed).

    `preload` (module names the ranks import anyway, e.g. ("megatron.core",)): start the
    ranks from the fork server (start method "forkserver") that imported them, instead of
    as fresh interpreters; the server starts on the first such call of this process, with
    that call's `preload` and the environment of that moment, and serves every later one
    (a rank sets what it needs itself: init_rank's MASTER_ADDR/PORT, DS_ACCELERATOR)."""
    import multiprocessing

    import torch.multiprocessing as mp

    method = "spawn"
    if preload:
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))
        method = "forkserver"
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world,
                             join=False, start_method=method)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=min(5.0, max(0.1, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise ExecutionError(f"{what}: the {world} ranks did not finish in "
                                     f"{timeout_s:.0f} s (killed)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        raise ExecutionError(f"{what}: a rank failed: {last[-1] if last else e}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)


def megatron_process_groups(rank: int, gpus: list, dp: int, tp: int, pp: int) -> dict:
    """This rank's megatron process groups of a dp x tp x pp mesh over `gpus`, plus
    "mesh"; every rank creates every group (torch.distributed requires it)."""
    import torch.distributed as dist

    from .megatron import megatron_groups

    groups = {}
    for kind, lists in megatron_groups(gpus, dp, tp, pp).items():
        for g in lists:
            pg = dist.new_group(list(g))
            if rank in g:
                groups[kind] = pg
    groups["mesh"] = dist.new_group(gpus)
    return groups


__all__ = ["ENGINE_MODULES", "free_port", "init_rank", "spawn",
           "megatron_process_groups"]
