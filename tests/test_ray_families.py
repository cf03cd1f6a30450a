"""Ray backend: the weights that reach generation after a reshard are the trained ones,
bit for bit, for the families with parameters beyond the basic Llama block — Qwen2 (q/k/v
biases, split over tp with their heads) and Qwen3 (q/k RMSNorm weights, head_dim !=
hidden / heads) — trained one step by megatron-core at tp=2 (sequence parallel) and by
DeepSpeed ZeRO-3 at dp=2, each resharded from its real layout onto generation replicas
on the other two GPUs.

The session-wide cluster of tests/conftest.py (4 fake GPUs on CPU), one ExecWorker actor
per GPU, gloo. The shard algebra alone, every family and degree: test_shard_families.py.
"""
from __future__ import annotations

import pytest

pytest.importorskip("ray")
pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")
torch = pytest.importorskip("torch")

from engine_diff import family_decl  # noqa: E402
from test_ray_reshard import batch, four_ranks  # noqa: E402

from graphrl.backends.ray.group import RankGroup  # noqa: E402
from graphrl.parallel import Strategy, megatron_groups  # noqa: E402
from graphrl.reshard_plan import plan_model_reshard  # noqa: E402

TIMEOUT = 120.0
# key: (family, engine, training GPUs, strategy); generation replicas on the other two
ENGINES = {"m2": ("qwen2", "megatron", (0, 1), Strategy(tp=2)),
           "m3": ("qwen3", "megatron", (2, 3), Strategy(tp=2)),
           "d2": ("qwen2", "deepspeed", (2, 3), Strategy(dp=2, zero=3)),
           "d3": ("qwen3", "deepspeed", (0, 1), Strategy(dp=2, zero=3))}


def _groups(ranks: RankGroup, key: str, engine: str, gpus: tuple, s: Strategy) -> tuple:
    """The process groups the engine needs, named `<key>/<kind>/<i>` (+ `<key>`: its
    mesh), as backends/ray/assign.py names them per mesh."""
    lists = (megatron_groups(gpus, s.dp, s.tp, s.pp) if engine == "megatron"
             else {"self": tuple((g,) for g in gpus)})
    names = [key]
    ranks.new_group(key, gpus)
    for kind, members in lists.items():
        for i, r in enumerate(members):
            ranks.new_group(f"{key}/{kind}/{i}", r)
            names.append(f"{key}/{kind}/{i}")
    return tuple(names)


@pytest.fixture(scope="module")
def ranks(ray_session):
    from graphrl.backends.ray.runtime import ExecWorker

    with four_ranks(TIMEOUT, ExecWorker) as group:
        yield group


def test_trained_weights_reach_generation_bit_for_bit(ranks, family_dirs):
    from graphrl.backends.ray.specs import EngineSpec

    specs = {}
    for key, (family, engine, gpus, s) in ENGINES.items():
        names = _groups(ranks, key, engine, gpus, s)
        d = family_dirs[family]
        specs[key] = EngineSpec(key, family_decl(d), {"lr": 1e-2, "checkpoint": d}, engine,
                                gpus, engine=engine, strategy=s, groups=names)
    data = batch(vocab=96)
    for engine in ("megatron", "deepspeed"):   # one engine per rank at a time, all ranks
        mine = {k: sp for k, sp in specs.items() if sp.kind == engine}
        # deadline: DeepSpeed may JIT-build its CPU comm op first (minutes on a busy host)
        ranks.call_each("build", {g: ((sp,), {}) for sp in mine.values() for g in sp.gpus},
                        deadline_s=400.0)
        ranks.call_each("train", {g: ((k, data), {"loss": "ppo", "seed": 0})
                                  for k, sp in mine.items() for g in sp.gpus})
    for key, (family, engine, gpus, s) in ENGINES.items():
        spec = specs[key]
        full = ranks.call("export_weights", key, on=list(gpus))[gpus[0]]
        start = family_dirs[family]
        other = [g for g in range(4) if g not in gpus]
        dst = ranks.call("build_replicated_engine", key + ".gen", spec.decl,
                         {"checkpoint": start}, other, seed=1, on=other)[other[0]]
        src = ranks.call("layout", key, on=[gpus[0]])[gpus[0]]
        assert list(src.names) == list(dst.names) == list(full), key
        plan = plan_model_reshard(src, dst, itemsize=4)
        ranks.reshard(plan, key, key + ".gen")
        got = ranks.call("export_weights", key + ".gen", on=other)
        for g in other:
            assert list(got[g]) == list(full), (key, g)
            for k in full:
                assert torch.equal(got[g][k], full[k]), (key, g, k)
        extra = [k for k in full if k.endswith(("_proj.bias", "_norm.weight"))
                 and ".self_attn." in k]
        assert len(extra) == (6 if family == "qwen2" else 4), (key, extra)
        # training moved them: the reshard carried trained values, not the checkpoint's
        ckpt = _module(start).state_dict()
        assert any(not torch.equal(full[k], ckpt[k]) for k in extra), key


def _module(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, local_files_only=True)
