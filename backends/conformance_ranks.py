"""The spawned ranks of `graphrl check-model` (conformance.py): each multi-rank strategy
(megatron tp/pp, DeepSpeed ZeRO) built on a group of gloo processes, measured on the
probe; rank 0 writes what it measured, or the engine's refusal (its UsageError)."""
from __future__ import annotations

from typing import Any

from graphrl.errors import UsageError


def build(engine: str, dp: int, tp: int, pp: int, zero: int, rank: int, world: int,
          decl: Any, options: dict) -> Any:
    """This rank's engine of one strategy, or None when the rank is outside its mesh.
    Every rank creates every process group (torch.distributed requires it)."""
    import torch.distributed as dist

    ranks = list(range(dp * tp * pp))
    if engine == "megatron":
        from .engines.megatron import MegatronEngine
        from .engines.spawn import megatron_process_groups

        groups = megatron_process_groups(rank, ranks, dp, tp, pp)
        if rank not in ranks:
            return None
        return MegatronEngine(decl, options, ranks=ranks, rank=rank, groups=groups, dp=dp,
                              tp=tp, pp=pp)
    from .engines.deepspeed_engine import DeepSpeedEngine

    selfs = [dist.new_group([r]) for r in range(world)]
    mesh = dist.new_group(ranks)
    if rank not in ranks:
        return None
    return DeepSpeedEngine(decl, options, ranks=ranks, rank=rank, group=mesh,
                           self_group=selfs[rank], zero=zero)


def worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    import os
    import warnings

    # the parent's stdout is its report (--json): the libraries' chatter goes to stderr
    os.dup2(2, 1)
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist

    from .conformance import Strategy, measure
    from .engines.spawn import init_rank

    init_rank(rank, world, port)
    try:
        spec = torch.load(job, weights_only=False)
        results = []
        for engine, dp, tp, pp, zero in spec["plan"]:
            what = f"{engine} {Strategy(engine, dp, tp, pp, zero).text()}"
            if rank == 0:
                with open(out + ".current", "w") as f:
                    f.write(what)
            try:
                eng = build(engine, dp, tp, pp, zero, rank, world, spec["decl"],
                            spec["options"])
                got = (measure(eng, spec["probe"], spec["inputs"]) if eng is not None
                       else None)
            except UsageError as e:
                got = {"refused": str(e)}
            except Exception as e:
                raise RuntimeError(f"{what}: {type(e).__name__}: {e}") from e
            results.append(got)
            dist.barrier()
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()
