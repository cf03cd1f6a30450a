"""Hugging Face <-> megatron-core weight conversion (pure tensor code, no process groups).

`to_megatron(hf, spec, tp, tp_rank, pp, pp_rank)` gives one rank's megatron-core `GPTModel`
state (local spec names, local layer numbers of its pipeline stage, its tensor-parallel
shard); `from_megatron(shards, spec, tp, pp)` puts the HF state back together from every
(pp_rank, tp_rank)'s state. Both are exact (copies and concatenations only): a round
trip returns the HF tensors bit for bit.

The layouts megatron-core uses (Shoeybi et al. 2019; megatron/core/transformer/attention.py
and mlp.py):
- `linear_qkv` fuses q, k, v per query group: for each of the n_kv groups, the rows of its
  n_q/n_kv query heads, then its key head, then its value head (d_head rows each). Tensor
  parallelism splits it in contiguous row blocks, so each rank holds whole groups.
- `linear_fc1` of a gated MLP (SwiGLU) holds gate and up: each tensor-parallel rank's
  local rows are [its gate rows; its up rows] (the activation splits its output in half),
  so the concatenation over ranks is NOT [gate; up] but rank-interleaved halves.
- `linear_qkv`'s bias (Qwen2's q/k/v biases; GPT-2) is fused and split like its rows.
- Qwen3's q/k RMSNorm weights (`q_layernorm`, `k_layernorm`: one d_head vector shared by
  every head) are replicated.
- Llama's mlp_bias: `linear_fc1`'s bias holds each rank's [gate; up] bias rows as its
  weight does; `linear_fc2`'s and attention_bias's `linear_proj` bias are replicated.
- `linear_proj`, `linear_fc2` are row-parallel (split along dim 1); their biases, the
  norms, GPT-2's learned positions and the scalar head are replicated.
- word embeddings and the LM output layer are vocab-parallel (dim 0).
GPT-2's HF `Conv1D` weights are stored transposed ([in, out]); megatron's are [out, in].
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from graphrl.errors import UsageError
from graphrl.types import ModelSpec

Tensor = torch.Tensor


# -- names -------------------------------------------------------------------------------
def _hf_prefix(spec: ModelSpec) -> str:
    """Prefix of the transformer body in the HF state dict (graphrl.backends.engines.hf)."""
    return "transformer." if spec.family == "gpt2" else "model."


def _hf_layer(spec: ModelSpec, i: int) -> str:
    p = _hf_prefix(spec)
    return f"{p}h.{i}." if spec.family == "gpt2" else f"{p}layers.{i}."


def stage_layers(spec: ModelSpec, pp: int, pp_rank: int) -> range:
    """Global decoder layers of pipeline stage `pp_rank` (contiguous, even split)."""
    if spec.num_layers % pp:
        raise UsageError(f"pipeline parallel {pp} does not divide the {spec.num_layers} "
                         "layers")
    per = spec.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def check_degrees(spec: ModelSpec, tp: int, pp: int) -> None:
    """megatron-core's constraints on tensor and pipeline degrees for this model."""
    problems = []
    if spec.num_heads % tp:
        problems.append(f"tp {tp} does not divide the {spec.num_heads} attention heads")
    if spec.num_kv_heads % tp:
        problems.append(f"tp {tp} does not divide the {spec.num_kv_heads} key/value heads")
    if spec.intermediate_size % tp:
        problems.append(f"tp {tp} does not divide the MLP width {spec.intermediate_size}")
    if spec.vocab_size % tp:
        problems.append(f"tp {tp} does not divide the vocabulary of {spec.vocab_size}")
    if spec.num_layers % pp:
        problems.append(f"pp {pp} does not divide the {spec.num_layers} layers")
    if problems:
        raise UsageError("megatron-core cannot split this model: " + "; ".join(problems))


def head_name(names: Any) -> str:
    """The scalar head's module name in an HF classification model."""
    for h in ("score", "classifier"):
        if h + ".weight" in names:
            return h
    raise UsageError("no scalar head (score / classifier) among the HF weights")


# -- fused tensors -----------------------------------------------------------------------
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: int, kv_heads: int) -> Tensor:
    """[q; k; v] rows (head-major each) -> megatron's per-group interleave."""
    d = q.shape[0] // heads
    per = heads // kv_heads
    rest = q.shape[1:]
    qg = q.reshape(kv_heads, per * d, *rest)
    kg = k.reshape(kv_heads, d, *rest)
    vg = v.reshape(kv_heads, d, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, heads: int, kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of fuse_qkv."""
    per = heads // kv_heads
    d = qkv.shape[0] // (heads + 2 * kv_heads)
    rest = qkv.shape[1:]
    g = qkv.reshape(kv_heads, (per + 2) * d, *rest)
    q, k, v = g.split([per * d, d, d], dim=1)
    return (q.reshape(-1, *rest).clone(), k.reshape(-1, *rest).clone(),
            v.reshape(-1, *rest).clone())


def _chunk(t: Tensor, tp: int, rank: int, dim: int = 0) -> Tensor:
    return t.chunk(tp, dim=dim)[rank].clone()


# -- HF -> megatron ----------------------------------------------------------------------
def _layer_to_megatron(hf: Mapping[str, Tensor], spec: ModelSpec, i: int, tp: int, r: int
                       ) -> dict[str, Tensor]:
    p = _hf_layer(spec, i)
    out: dict[str, Tensor] = {}
    h, nq, nkv = spec.hidden_size, spec.num_heads, spec.num_kv_heads
    if spec.family == "gpt2":
        w = hf[p + "attn.c_attn.weight"].t()          # Conv1D [in, out] -> [out, in]
        b = hf[p + "attn.c_attn.bias"]
        qkv_w = fuse_qkv(*w.split(h, dim=0), nq, nkv)
        qkv_b = fuse_qkv(*b.split(h, dim=0), nq, nkv)
        out.update({
            "input_layernorm.weight": hf[p + "ln_1.weight"].clone(),
            "input_layernorm.bias": hf[p + "ln_1.bias"].clone(),
            "self_attention.linear_qkv.weight": _chunk(qkv_w, tp, r),
            "self_attention.linear_qkv.bias": _chunk(qkv_b, tp, r),
            "self_attention.linear_proj.weight": _chunk(hf[p + "attn.c_proj.weight"].t(), tp, r, 1),
            "self_attention.linear_proj.bias": hf[p + "attn.c_proj.bias"].clone(),
            "pre_mlp_layernorm.weight": hf[p + "ln_2.weight"].clone(),
            "pre_mlp_layernorm.bias": hf[p + "ln_2.bias"].clone(),
            "mlp.linear_fc1.weight": _chunk(hf[p + "mlp.c_fc.weight"].t(), tp, r),
            "mlp.linear_fc1.bias": _chunk(hf[p + "mlp.c_fc.bias"], tp, r),
            "mlp.linear_fc2.weight": _chunk(hf[p + "mlp.c_proj.weight"].t(), tp, r, 1),
            "mlp.linear_fc2.bias": hf[p + "mlp.c_proj.bias"].clone(),
        })
        return out
    a = p + "self_attn."
    qkv = fuse_qkv(hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"],
                   nq, nkv)
    gate = _chunk(hf[p + "mlp.gate_proj.weight"], tp, r)
    up = _chunk(hf[p + "mlp.up_proj.weight"], tp, r)
    if a + "q_proj.bias" in hf:   # Qwen2: biases fused per group as the weight rows are
        qkv_b = fuse_qkv(hf[a + "q_proj.bias"], hf[a + "k_proj.bias"], hf[a + "v_proj.bias"],
                         nq, nkv)
        out["self_attention.linear_qkv.bias"] = _chunk(qkv_b, tp, r)
    if a + "o_proj.bias" in hf:   # Llama attention_bias: replicated, added after the reduce
        out["self_attention.linear_proj.bias"] = hf[a + "o_proj.bias"].clone()
    if p + "mlp.gate_proj.bias" in hf:   # Llama mlp_bias: fc1's as its rows, fc2's replicated
        out["mlp.linear_fc1.bias"] = torch.cat([_chunk(hf[p + "mlp.gate_proj.bias"], tp, r),
                                                _chunk(hf[p + "mlp.up_proj.bias"], tp, r)])
        out["mlp.linear_fc2.bias"] = hf[p + "mlp.down_proj.bias"].clone()
    for x in "qk":   # Qwen3: one RMSNorm weight per d_head, shared by every head
        if f"{a}{x}_norm.weight" in hf:
            out[f"self_attention.{x}_layernorm.weight"] = hf[f"{a}{x}_norm.weight"].clone()
    out.update({
        "input_layernorm.weight": hf[p + "input_layernorm.weight"].clone(),
        "self_attention.linear_qkv.weight": _chunk(qkv, tp, r),
        "self_attention.linear_proj.weight": _chunk(hf[a + "o_proj.weight"], tp, r, 1),
        "pre_mlp_layernorm.weight": hf[p + "post_attention_layernorm.weight"].clone(),
        "mlp.linear_fc1.weight": torch.cat([gate, up]),
        "mlp.linear_fc2.weight": _chunk(hf[p + "mlp.down_proj.weight"], tp, r, 1),
    })
    return out


def to_megatron(hf: Mapping[str, Tensor], spec: ModelSpec, *, tp: int = 1, tp_rank: int = 0,
                pp: int = 1, pp_rank: int = 0) -> dict[str, Tensor]:
    """One rank's megatron-core GPTModel state from the full HF state dict."""
    check_degrees(spec, tp, pp)
    pre, r = _hf_prefix(spec), tp_rank
    out: dict[str, Tensor] = {}
    layers = stage_layers(spec, pp, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp - 1
    gpt2 = spec.family == "gpt2"
    emb = hf[pre + ("wte.weight" if gpt2 else "embed_tokens.weight")]
    if first:
        out["embedding.word_embeddings.weight"] = _chunk(emb, tp, r)
        if gpt2:
            out["embedding.position_embeddings.weight"] = hf[pre + "wpe.weight"].clone()
    for local, i in enumerate(layers):
        for k, v in _layer_to_megatron(hf, spec, i, tp, r).items():
            out[f"decoder.layers.{local}.{k}"] = v
    if last:
        norm = pre + ("ln_f." if gpt2 else "norm.")
        out["decoder.final_layernorm.weight"] = hf[norm + "weight"].clone()
        if gpt2:
            out["decoder.final_layernorm.bias"] = hf[norm + "bias"].clone()
        if spec.head == "lm":
            src = emb if spec.tie_embeddings else hf["lm_head.weight"]
            out["output_layer.weight"] = _chunk(src, tp, r)   # tied, pp > 1: a copy
        else:   # HF token / sequence classification heads: `score` or `classifier`
            h = head_name(hf)
            out["output_layer.weight"] = hf[h + ".weight"].clone()
            if h + ".bias" in hf:
                out["output_layer.bias"] = hf[h + ".bias"].clone()
    return out


# -- megatron -> HF ----------------------------------------------------------------------
def _cat(shards: list[Mapping[str, Tensor]], name: str, dim: int = 0) -> Tensor:
    return torch.cat([s[name] for s in shards], dim=dim)


def _layer_from_megatron(tps: list[Mapping[str, Tensor]], spec: ModelSpec, i: int,
                         local: int) -> dict[str, Tensor]:
    m = f"decoder.layers.{local}."
    p = _hf_layer(spec, i)
    nq, nkv = spec.num_heads, spec.num_kv_heads
    one = tps[0]
    q, k, v = split_qkv(_cat(tps, m + "self_attention.linear_qkv.weight"), nq, nkv)
    if spec.family == "gpt2":
        qb, kb, vb = split_qkv(_cat(tps, m + "self_attention.linear_qkv.bias"), nq, nkv)
        return {
            p + "ln_1.weight": one[m + "input_layernorm.weight"].clone(),
            p + "ln_1.bias": one[m + "input_layernorm.bias"].clone(),
            p + "attn.c_attn.weight": torch.cat([q, k, v]).t().contiguous(),
            p + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
            p + "attn.c_proj.weight":
                _cat(tps, m + "self_attention.linear_proj.weight", 1).t().contiguous(),
            p + "attn.c_proj.bias": one[m + "self_attention.linear_proj.bias"].clone(),
            p + "ln_2.weight": one[m + "pre_mlp_layernorm.weight"].clone(),
            p + "ln_2.bias": one[m + "pre_mlp_layernorm.bias"].clone(),
            p + "mlp.c_fc.weight": _cat(tps, m + "mlp.linear_fc1.weight").t().contiguous(),
            p + "mlp.c_fc.bias": _cat(tps, m + "mlp.linear_fc1.bias"),
            p + "mlp.c_proj.weight": _cat(tps, m + "mlp.linear_fc2.weight", 1).t().contiguous(),
            p + "mlp.c_proj.bias": one[m + "mlp.linear_fc2.bias"].clone(),
        }
    halves = [s[m + "mlp.linear_fc1.weight"].chunk(2) for s in tps]
    a = p + "self_attn."
    extra: dict[str, Tensor] = {}
    if m + "self_attention.linear_qkv.bias" in one:
        qb, kb, vb = split_qkv(_cat(tps, m + "self_attention.linear_qkv.bias"), nq, nkv)
        extra = {a + "q_proj.bias": qb, a + "k_proj.bias": kb, a + "v_proj.bias": vb}
    if m + "self_attention.linear_proj.bias" in one:
        extra[a + "o_proj.bias"] = one[m + "self_attention.linear_proj.bias"].clone()
    if m + "mlp.linear_fc1.bias" in one:
        fc1 = [s[m + "mlp.linear_fc1.bias"].chunk(2) for s in tps]
        extra[p + "mlp.gate_proj.bias"] = torch.cat([g for g, _ in fc1])
        extra[p + "mlp.up_proj.bias"] = torch.cat([u for _, u in fc1])
        extra[p + "mlp.down_proj.bias"] = one[m + "mlp.linear_fc2.bias"].clone()
    for x in "qk":
        if f"{m}self_attention.{x}_layernorm.weight" in one:
            extra[f"{a}{x}_norm.weight"] = one[f"{m}self_attention.{x}_layernorm.weight"].clone()
    return {
        **extra,
        a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v,
        a + "o_proj.weight": _cat(tps, m + "self_attention.linear_proj.weight", 1),
        p + "mlp.gate_proj.weight": torch.cat([g for g, _ in halves]),
        p + "mlp.up_proj.weight": torch.cat([u for _, u in halves]),
        p + "mlp.down_proj.weight": _cat(tps, m + "mlp.linear_fc2.weight", 1),
        p + "input_layernorm.weight": one[m + "input_layernorm.weight"].clone(),
        p + "post_attention_layernorm.weight": one[m + "pre_mlp_layernorm.weight"].clone(),
    }


def from_megatron(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], spec: ModelSpec,
                  tp: int, pp: int, order: Any = None) -> dict[str, Tensor]:
    """The full HF state dict from every rank's megatron state, keyed (pp_rank, tp_rank).
    `order`: HF names in the order wanted (default: this function's order)."""
    check_degrees(spec, tp, pp)
    missing = [(s, t) for s in range(pp) for t in range(tp) if (s, t) not in shards]
    if missing:
        raise UsageError(f"from_megatron: no state for (pp_rank, tp_rank) {missing}")
    pre = _hf_prefix(spec)
    gpt2 = spec.family == "gpt2"
    out: dict[str, Tensor] = {}
    first = [shards[(0, t)] for t in range(tp)]
    last = [shards[(pp - 1, t)] for t in range(tp)]
    emb = _cat(first, "embedding.word_embeddings.weight")
    out[pre + ("wte.weight" if gpt2 else "embed_tokens.weight")] = emb
    if gpt2:
        out[pre + "wpe.weight"] = first[0]["embedding.position_embeddings.weight"].clone()
    for s in range(pp):
        tps = [shards[(s, t)] for t in range(tp)]
        for local, i in enumerate(stage_layers(spec, pp, s)):
            out.update(_layer_from_megatron(tps, spec, i, local))
    norm = pre + ("ln_f." if gpt2 else "norm.")
    out[norm + "weight"] = last[0]["decoder.final_layernorm.weight"].clone()
    if gpt2:
        out[norm + "bias"] = last[0]["decoder.final_layernorm.bias"].clone()
    if spec.head == "lm":
        out["lm_head.weight"] = emb if spec.tie_embeddings else _cat(last, "output_layer.weight")
    else:
        h = head_name(order or ("score.weight",))
        out[h + ".weight"] = last[0]["output_layer.weight"].clone()
        if "output_layer.bias" in last[0]:
            out[h + ".bias"] = last[0]["output_layer.bias"].clone()
    if order is not None:
        keys = list(order)
        extra, lack = sorted(set(out) - set(keys)), sorted(set(keys) - set(out))
        if extra or lack:
            raise UsageError(f"from_megatron: names differ from the HF model's "
                             f"(extra {extra[:3]}, missing {lack[:3]})")
        out = {k: out[k] for k in keys}
    return out


def local_hf(local: Mapping[str, Tensor], spec: ModelSpec, *, tp: int, pp: int,
             pp_rank: int) -> dict[str, Tensor]:
    """One rank's megatron state in HF names and coordinates: for every HF weight its
    stage holds, the part this tensor-parallel rank holds (copies), as one tensor — GPT-2's
    c_attn weight/bias hold the rank's q, k and v blocks side by side along the last dim
    (three pieces of graphrl.shard's `fused3` layout). Un-fusing uses the rank's own head
    counts, so no other rank's shard is needed."""
    import dataclasses

    sub = dataclasses.replace(spec, num_heads=spec.num_heads // tp,
                              num_kv_heads=spec.num_kv_heads // tp)
    pre, gpt2 = _hf_prefix(spec), spec.family == "gpt2"
    out: dict[str, Tensor] = {}
    if pp_rank == 0:
        out[pre + ("wte.weight" if gpt2 else "embed_tokens.weight")] = \
            local["embedding.word_embeddings.weight"].detach().clone()
        if gpt2:
            out[pre + "wpe.weight"] = local["embedding.position_embeddings.weight"].detach().clone()
    det = {k: v.detach() for k, v in local.items()}
    for i_local, i in enumerate(stage_layers(spec, pp, pp_rank)):
        out.update(_layer_from_megatron([det], sub, i, i_local))
    if pp_rank == pp - 1:
        norm = pre + ("ln_f." if gpt2 else "norm.")
        out[norm + "weight"] = det["decoder.final_layernorm.weight"].clone()
        if gpt2:
            out[norm + "bias"] = det["decoder.final_layernorm.bias"].clone()
        if spec.head == "lm":
            lm = det.get("output_layer.weight", det.get("embedding.word_embeddings.weight"))
            out["lm_head.weight"] = lm.clone()
        else:
            h = "classifier" if gpt2 and spec.head == "value" else "score"
            out[h + ".weight"] = det["output_layer.weight"].clone()
            if "output_layer.bias" in det:
                out[h + ".bias"] = det["output_layer.bias"].clone()
    return out


def layout_pieces(mine: Mapping[str, Tensor], layout: Any, rank: int, what: str = ""
                  ) -> dict[str, list[Tensor]]:
    """One rank's local_hf tensors cut into the pieces `layout` (graphrl.shard.ModelLayout
    of megatron_params) puts on `rank`, in `pieces_on(rank)` order: one tensor per piece
    (GPT-2's fused c_attn: its q, k and v blocks). ValueError when a shape disagrees."""
    out: dict[str, list[Tensor]] = {}
    for name, lay in layout.items():
        pieces = lay.pieces_on(rank)
        if not pieces:
            out[name] = []
            continue
        t = mine[name]
        parts = list(t.chunk(3, dim=-1)) if len(pieces) == 3 else [t]
        for piece, a in zip(pieces, parts):
            if tuple(a.shape) != piece.extents:
                raise ValueError(f"{what}: {name} piece {tuple(a.shape)} on rank {rank}, "
                                 f"layout {lay.text()}")
        out[name] = [a.contiguous() for a in parts]
    return out


__all__ = ["layout_pieces", "local_hf", "to_megatron", "from_megatron", "fuse_qkv",
           "split_qkv", "stage_layers", "check_degrees"]
