"""The spawned ranks of `graphrl check-model` (conformance.py): each multi-rank strategy
(megatron tp/pp, DeepSpeed ZeRO) built on a group of gloo processes, measured on the
probe; rank 0 writes what it measured (`measure`, which conformance.py also runs on the
one-process engines), or the engine's refusal (its UsageError)."""
from __future__ import annotations

from typing import Any, Mapping

from graphrl.errors import UsageError


def build(engine: str, dp: int, tp: int, pp: int, zero: int, rank: int, world: int,
          decl: Any, options: dict) -> Any:
    """This rank's engine of one strategy (engines.registry), or None when the rank is
    outside its mesh. Every rank creates every process group (torch.distributed requires
    it)."""
    import torch.distributed as dist

    from graphrl.parallel import Strategy

    from .engines.registry import RankMesh, create_engine

    ranks = list(range(dp * tp * pp))
    if engine == "megatron":
        from .engines.spawn import megatron_process_groups

        groups = megatron_process_groups(rank, ranks, dp, tp, pp)
    else:
        selfs = [dist.new_group([r]) for r in range(world)]
        groups = {"mesh": dist.new_group(ranks), "self": selfs[rank]}
    if rank not in ranks:
        return None
    mesh = RankMesh(tuple(ranks), rank, groups, Strategy(dp=dp, tp=tp, pp=pp, zero=zero))
    return create_engine(engine, decl, options, "cpu", 0, mesh)


def ran_precision(engine: Any) -> str:
    """The precision an engine ran, read off what it holds and runs (hf/fast:
    `ran_precision()`, megatron/DeepSpeed: their `degrees()` report), else the dtype of
    its parameters (fp32 unless they are bf16)."""
    if hasattr(engine, "ran_precision"):
        said = engine.ran_precision()
    else:
        said = engine.degrees().get("precision") if hasattr(engine, "degrees") else None
    if isinstance(said, str):
        return said
    import torch

    for attr in ("module", "hf"):
        m = getattr(engine, attr, None)
        m = getattr(m, "module", m)
        if isinstance(m, torch.nn.Module):
            return "bf16" if any(p.dtype == torch.bfloat16 for p in m.parameters()) else "fp32"
    return "fp32"


def measure(engine: Any, probe: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict:
    """What an engine computes on the probe: log-probs, the loss of one GRPO step and
    its weights after it (full weights, every rank)."""
    fed = {k: probe[k] for k in ("tokens", "attention_mask")}
    logprobs = engine.forward(fed)["logprobs"]
    start = engine.export_weights()
    stats = engine.train(inputs, loss="grpo", seed=0)
    return {"logprobs": logprobs, "loss": float(stats["loss"]), "start": start,
            "weights": engine.export_weights(), "precision": ran_precision(engine)}


def worker(rank: int, world: int, port: int, job: str, out: str) -> None:
    import os
    import warnings

    # the parent's stdout is its report (--json): the libraries' chatter goes to stderr
    os.dup2(2, 1)
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed as dist

    from .engines.spawn import init_rank

    init_rank(rank, world, port)
    try:
        spec = torch.load(job, weights_only=False)
        results = []
        for engine, dp, tp, pp, zero, text in spec["plan"]:
            what = f"{engine} {text}"
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
