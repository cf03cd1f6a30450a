"""The shard catalog lists every parameter of every family, and megatron's ranks hold
exactly what it says: a checkpoint (graphrl.families) converted to each rank of tp=2,
pp=2 and tp=2 x pp=2 (megatron_convert.to_megatron), read back in HF coordinates
(local_hf) and cut by the catalog's layout (graphrl.shard.megatron_params), reassembles
to the checkpoint bit for bit, and so does from_megatron of the ranks' states — Qwen2's
q/k/v biases split with their heads, Qwen3's q/k norms and head_dim != hidden / heads,
Llama's attention_bias and mlp_bias included. The Ray run of the same layouts:
tests/test_ray_families.py."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from graphrl.families import TINY  # noqa: E402


def _module(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, local_files_only=True)


EXTRA = ["llama2_attention_bias", "llama2_mlp_bias"]   # tests/conftest.py family_dirs


@pytest.mark.parametrize("family", list(TINY) + EXTRA)
def test_megatron_ranks_reassemble_the_checkpoint(family, family_dirs):
    from engine_diff import family_decl

    from graphrl.backends.engines.megatron_convert import (from_megatron, layout_pieces,
                                                           local_hf, to_megatron)
    from graphrl.parallel import DeviceMesh, Strategy
    from graphrl.shard import Box, megatron_params, model_layout

    decl = family_decl(family_dirs[family])
    hf = _module(family_dirs[family]).state_dict()
    spec = decl.spec
    params = megatron_params([(k, tuple(v.shape)) for k, v in hf.items()], spec.num_layers)
    assert [p.name for p in params] == list(hf)
    for tp, pp in ((2, 1), (1, 2), (2, 2)):
        layout = model_layout(params, DeviceMesh(tuple(range(tp * pp))), Strategy(tp=tp, pp=pp),
                              num_layers=spec.num_layers)
        full = {k: torch.full_like(v, float("nan")) for k, v in hf.items()}
        shards = {}
        for rank in range(tp * pp):
            pp_rank, tp_rank = divmod(rank, tp)
            local = to_megatron(hf, spec, tp=tp, tp_rank=tp_rank, pp=pp, pp_rank=pp_rank)
            shards[(pp_rank, tp_rank)] = local
            mine = local_hf(local, spec, tp=tp, pp=pp, pp_rank=pp_rank)
            for name, arrays in layout_pieces(mine, layout, rank, family).items():
                for piece, a in zip(layout[name].pieces_on(rank), arrays):
                    assert isinstance(piece, Box)
                    full[name][piece.slices()] = a
        back = from_megatron(shards, spec, tp, pp, order=list(hf))   # export_weights' path
        for k, v in hf.items():
            assert layout[k].is_complete(), (family, tp, pp, k)
            assert torch.equal(full[k], v), (family, tp, pp, k)
            assert torch.equal(back[k], v), (family, tp, pp, k)
    kinds = {p.name.split(".", 3)[-1]: p.kind for p in params if ".layers.0." in p.name}
    if family == "qwen2":   # split over tp with their heads, not replicated
        assert {kinds[f"self_attn.{x}_proj.bias"] for x in "qkv"} == {"colwise"}
    if family == "qwen3":
        assert {kinds[f"self_attn.{x}_norm.weight"] for x in "qk"} == {"replicate"}


@pytest.mark.parametrize("family", [f for f in TINY if f != "gpt2"] + EXTRA)
def test_llama_params_list_every_weight(family, family_dirs):
    """The catalog of a Llama-family model (graphrl.shard.llama_params, what the Ray
    backend's sharded engines and the reshard planner use) names every weight of the
    checkpoint's module with its shape, in state_dict order; so does param_specs of the
    checkpoint."""
    from engine_diff import family_decl

    from graphrl.architecture import architecture
    from graphrl.backends.ray.sharded import param_specs
    from graphrl.shard import llama_params

    module = _module(family_dirs[family])
    s = family_decl(family_dirs[family]).spec
    arch = architecture(module.config.to_dict())
    params = llama_params(s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads,
                          s.intermediate_size, s.vocab_size, tie_embeddings=s.tie_embeddings,
                          head_dim=arch.head_dim, qkv_bias=arch.qkv_bias,
                          o_bias=arch.o_bias, qk_norm=arch.qk_norm, mlp_bias=arch.mlp_bias)
    state = module.state_dict()
    want = [(k, tuple(v.shape)) for k, v in state.items()
            if not (s.tie_embeddings and k == "lm_head.weight")]
    assert [(p.name, p.shape) for p in params] == want
    specs = param_specs(family_decl(family_dirs[family]), checkpoint=family_dirs[family])
    assert [(p.name, p.shape) for p in specs] == [(k, tuple(v.shape)) for k, v in state.items()]
