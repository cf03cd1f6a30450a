"""Decode-only torch model code for the fast engine: Llama- and GPT-2-shaped causal LMs
over a preallocated static KV cache of `slots` sequences x `max_len` positions.

The weights are copied (in place, so captured CUDA graphs stay valid) from the Hugging
Face module the engine trains, with Llama's q/k/v and gate/up projections fused into one
matmul each, RMSNorm weights folded into the next projection (W diag(w)), and q/k rows
pair-interleaved per head (fast_forward.interleave_rows) so that rotary embeddings are one
complex multiply by a precomputed table; residual adds ride in the output projections
(addmm). Sequences are stored unpadded: a sequence in slot s holds its real tokens at
cache positions 0..len-1, so position ids equal cache positions and a decode step masks
each slot by its own length. Formulas follow the architectures' papers: RMSNorm (Zhang &
Sennrich 2019), rotary embeddings (Su et al. 2021), SwiGLU (Shazeer 2020) for Llama
(Touvron et al. 2023); pre-LayerNorm blocks with learned positions and tanh-GELU for GPT-2
(Radford et al. 2019). Llama-family variants: Llama 3.1's rotary frequency scaling
(rope_inv_freq), q/k/v, o_proj and MLP biases (Qwen2, attention_bias, mlp_bias; the q/k
biases permuted with their rows), Qwen3's per-head q/k RMSNorm between the projection and
the rotation (its weights permuted like the rows, not foldable), head_dim != hidden /
heads, and sliding-window attention per layer (Mistral, Qwen2/3 layer_types). The engine
refuses anything else first (graphrl.architecture.ENGINE_FEATURES["fast"]).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graphrl.errors import UsageError

from .fast_forward import interleave_rows, sliding_windows


def rope_inv_freq(config: Any, head_dim: int, device: Any = None) -> torch.Tensor:
    """The rotary inverse frequencies theta_j = base^(-2j/d) (Su et al. 2021) of a Llama-
    family config, float32 [d/2], with Llama 3.1's frequency-dependent scaling for
    rope_type "llama3". Other scalings (linear, dynamic, yarn, ...) are refused: the
    engine's constructor refuses them first (graphrl.architecture.refuse_unsupported).

    Llama 3.1 scaling (Meta's Llama 3.1 release, `apply_scaling` in its reference code;
    transformers' `_compute_llama3_parameters` publishes the same formula), with
    L = original_max_position_embeddings and wavelength 2 pi / theta_j:
    wavelengths longer than L / low_freq_factor are divided by `factor` (theta / factor),
    shorter than L / high_freq_factor kept, and in between
    theta' = (1 - s) theta / factor + s theta, s = (L / wavelength - low) / (high - low)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    base = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    inv = 1.0 / (float(base) ** (torch.arange(0, head_dim, 2, dtype=torch.int64)
                                 .to(device=device, dtype=torch.float32) / head_dim))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise UsageError(f"engine fast: rope_type {kind!r} is not supported (default and "
                         "llama3 only); use engine=hf for this checkpoint")
    factor, low = float(params["factor"]), float(params["low_freq_factor"])
    high, old = float(params["high_freq_factor"]), params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    s = (old / wavelen - low) / (high - low)
    smooth = (1 - s) * scaled / factor + s * scaled
    middle = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(middle, smooth, scaled)


class FastLM:
    """Prefill and decode over a static KV cache. `module` is the Hugging Face causal LM
    whose weights `refresh()` copies."""

    def __init__(self, module: nn.Module, slots: int, max_len: int,
                 dtype: torch.dtype | None = None, merged: Any = None):
        cfg = module.config
        self.module = module
        self.merged = merged   # LoRA: a context in which module's weights are W + s B A
        self.family = "gpt2" if cfg.model_type == "gpt2" else "llama"
        p = next(module.parameters())
        # weights and KV cache in `dtype` (the model's precision), default the module's
        self.device, self.dtype = p.device, dtype or p.dtype
        if self.family == "gpt2":
            self.layers, self.heads = cfg.n_layer, cfg.n_head
            self.kv_heads = self.heads
            self.head_dim = cfg.n_embd // self.heads
            self.eps = cfg.layer_norm_epsilon
            if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
                raise UsageError(f"engine fast: GPT-2 activation {cfg.activation_function!r} "
                                 "is not supported")
            self.gelu = "none" if cfg.activation_function == "gelu" else "tanh"
            scale = 1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0
            self.scales = [scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
                           for i in range(self.layers)]
            self.max_positions = cfg.n_positions
            self.qk_norm = False
        else:
            if getattr(cfg, "hidden_act", "silu") != "silu":
                raise UsageError(f"engine fast: Llama activation {cfg.hidden_act!r} is not "
                                 "supported (silu only)")
            self.layers, self.heads = cfg.num_hidden_layers, cfg.num_attention_heads
            self.kv_heads = cfg.num_key_value_heads or self.heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
            self.eps = cfg.rms_norm_eps
            self.scales = [1.0 / math.sqrt(self.head_dim)] * self.layers
            self.max_positions = cfg.max_position_embeddings
            self.qk_norm = getattr(module.model.layers[0].self_attn, "q_norm", None) is not None
        self.windows = sliding_windows(cfg, self.layers)
        if max_len > self.max_positions:
            raise UsageError(f"engine fast: prompt + new tokens = {max_len} positions exceed "
                             f"the model's {self.max_positions}")
        self.slots, self.max_len = slots, max_len
        shape = (self.layers, slots, self.kv_heads, max_len, self.head_dim)
        # keys stored transposed ([.., head_dim, max_len]): a decode step's q.K^T then
        # reads each key matrix in its natural layout (several times faster on CPU)
        self.k = torch.zeros(shape[:3] + (self.head_dim, max_len), dtype=self.dtype,
                             device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.w: dict[str, torch.Tensor] = {}
        if self.family == "llama":
            inv = rope_inv_freq(cfg, self.head_dim, self.device)
            ang = torch.arange(max_len, dtype=torch.float32, device=self.device)[:, None] * inv
            rot = torch.polar(torch.ones_like(ang), ang)          # e^{i pos theta_j}
            self.rot = rot.to(torch.complex128) if self.dtype == torch.float64 else rot
            self.qk_rows = torch.cat([
                interleave_rows(self.heads, self.head_dim, self.device),
                self.heads * self.head_dim + interleave_rows(self.kv_heads, self.head_dim,
                                                             self.device)])
        self.refresh()

    # -- weights --------------------------------------------------------------------------
    def _put(self, name: str, value: torch.Tensor) -> None:
        """Copy into the persistent buffer `name` (allocated on first use)."""
        value = value.detach()
        if name not in self.w:
            self.w[name] = torch.empty(value.shape, dtype=self.dtype, device=self.device)
        self.w[name].copy_(value)

    def refresh(self) -> None:
        """Copy the module's current weights into this model's buffers (in place); with
        `merged` (LoRA adapters), the weights with the adapters folded in."""
        if self.merged is not None:
            with self.merged():
                return self._refresh()
        return self._refresh()

    def _refresh(self) -> None:
        m = self.module
        if self.family == "gpt2":
            t = m.transformer
            self._put("wte", t.wte.weight)
            self._put("wpe", t.wpe.weight)
            self._put("lnf_w", t.ln_f.weight)
            self._put("lnf_b", t.ln_f.bias)
            self._put("head", m.lm_head.weight)
            for i, blk in enumerate(t.h):
                for name, param in (("ln1_w", blk.ln_1.weight), ("ln1_b", blk.ln_1.bias),
                                    ("ln2_w", blk.ln_2.weight), ("ln2_b", blk.ln_2.bias),
                                    ("qkv_w", blk.attn.c_attn.weight),
                                    ("qkv_b", blk.attn.c_attn.bias),
                                    ("o_w", blk.attn.c_proj.weight), ("o_b", blk.attn.c_proj.bias),
                                    ("fc_w", blk.mlp.c_fc.weight), ("fc_b", blk.mlp.c_fc.bias),
                                    ("pr_w", blk.mlp.c_proj.weight),
                                    ("pr_b", blk.mlp.c_proj.bias)):
                    self._put(f"{i}.{name}", param)   # Conv1D: x @ W + b, W is [in, out]
            return
        body = m.model
        self._put("wte", body.embed_tokens.weight)
        self._put("head", m.lm_head.weight * body.norm.weight)
        for i, layer in enumerate(body.layers):
            a, f = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            qk = torch.cat([a.q_proj.weight, a.k_proj.weight]).index_select(0, self.qk_rows)
            self._put(f"{i}.qkv_w", (torch.cat([qk, a.v_proj.weight]) * ln1).t())
            if a.q_proj.bias is not None:
                qkb = torch.cat([a.q_proj.bias, a.k_proj.bias]).index_select(0, self.qk_rows)
                self._put(f"{i}.qkv_b", torch.cat([qkb, a.v_proj.bias]))
            if self.qk_norm:   # per-head weights [H+K, d], rows pair-interleaved like q/k
                d = self.head_dim
                w = torch.cat([a.q_norm.weight.expand(self.heads, d),
                               a.k_norm.weight.expand(self.kv_heads, d)])
                self._put(f"{i}.qkn", w[:, interleave_rows(1, d, w.device)])
            self._put(f"{i}.o_w", a.o_proj.weight.t())
            if a.o_proj.bias is not None:
                self._put(f"{i}.o_b", a.o_proj.bias)
            self._put(f"{i}.gu_w", (torch.cat([f.gate_proj.weight, f.up_proj.weight]) * ln2).t())
            if f.gate_proj.bias is not None:
                self._put(f"{i}.gu_b", torch.cat([f.gate_proj.bias, f.up_proj.bias]))
            self._put(f"{i}.dn_w", f.down_proj.weight.t())
            if f.down_proj.bias is not None:
                self._put(f"{i}.dn_b", f.down_proj.bias)

    # -- blocks ---------------------------------------------------------------------------
    def _lin(self, x: torch.Tensor, name: str, residual: torch.Tensor | None = None
             ) -> torch.Tensor:
        """x @ W (+ b) (+ residual) over x's last dim, the residual add inside the matmul."""
        b = self.w.get(name[:-1] + "b")
        w = self.w[name]
        flat = x.reshape(-1, x.shape[-1])
        if residual is None and b is None:
            return (flat @ w).view(*x.shape[:-1], -1)
        base = residual.reshape(-1, w.shape[1]) if residual is not None else b
        if residual is not None and b is not None:
            base = base + b
        return torch.addmm(base, flat, w).view(*x.shape[:-1], -1)

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next projection)."""
        return F.rms_norm(x, x.shape[-1:], None, self.eps)

    def _norm1(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.family == "gpt2":
            return F.layer_norm(x, x.shape[-1:], self.w[f"{i}.ln1_w"], self.w[f"{i}.ln1_b"],
                                self.eps)
        return self._rms(x)

    def _mlp(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x plus the MLP block of layer i."""
        if self.family == "gpt2":
            h = F.layer_norm(x, x.shape[-1:], self.w[f"{i}.ln2_w"], self.w[f"{i}.ln2_b"],
                             self.eps)
            h = F.gelu(self._lin(h, f"{i}.fc_w"), approximate=self.gelu)
            return self._lin(h, f"{i}.pr_w", residual=x)
        gate, up = self._lin(self._rms(x), f"{i}.gu_w").chunk(2, dim=-1)
        return self._lin(F.silu(gate).mul_(up), f"{i}.dn_w", residual=x)

    def _qkv(self, x: torch.Tensor, i: int, rot: torch.Tensor | None):
        """q [n,H,t,d], k and v [n,Hkv,t,d] of hidden states x [n,t,e]; Llama's q and k
        (pair-interleaved rows) rotated by rot [n,t,1,d/2] (complex, Su et al. 2021)."""
        n, t, _ = x.shape
        qkv = self._lin(self._norm1(x, i), f"{i}.qkv_w")
        hq, hk = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.family == "llama":
            qk = qkv[..., :hq + hk].unflatten(-1, (-1, self.head_dim))
            if self.qk_norm:   # Qwen3: RMSNorm per head over head_dim (in fp32), before rotary
                qk = (F.rms_norm(qk.float(), qk.shape[-1:], None, self.eps).to(qkv.dtype)
                      * self.w[f"{i}.qkn"])
            qk = qk.unflatten(-1, (-1, 2))
            wide = qk if qk.dtype in (torch.float32, torch.float64) else qk.float()
            qk = torch.view_as_real(torch.view_as_complex(wide) * rot).flatten(-2).to(qkv.dtype)
            q, k = qk[:, :, :self.heads], qk[:, :, self.heads:]
        else:
            q = qkv[..., :hq].view(n, t, self.heads, self.head_dim)
            k = qkv[..., hq:hq + hk].view(n, t, self.kv_heads, self.head_dim)
        v = qkv[..., hq + hk:].view(n, t, self.kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _embed(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.w["wte"])
        return x + F.embedding(pos, self.w["wpe"]) if self.family == "gpt2" else x

    def _rot(self, pos: torch.Tensor) -> torch.Tensor | None:
        """The rotary factors of positions pos [n, t] as [n, t, 1, d/2] (Llama only)."""
        return self.rot[pos].unsqueeze(2) if self.family == "llama" else None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            x = F.layer_norm(x, x.shape[-1:], self.w["lnf_w"], self.w["lnf_b"], self.eps)
        else:
            x = self._rms(x)
        return (x @ self.w["head"].t()).float()

    def _attend(self, q, k, v, mask, i: int) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scales[i],
                                             enable_gqa=self.kv_heads != self.heads)
        n, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(n, t, self.heads * self.head_dim)

    def _attend_one(self, q, k, v, bias, i: int) -> torch.Tensor:
        """Attention of one query token per row (decode): q [b,H,1,d] over keys k
        [b,Hkv,d,T] (transposed) and values v [b,Hkv,T,d] with an additive mask bias
        [b*Hkv,1,T] (0 or -inf), as two batched
        matmuls (query heads grouped by their kv head, Ainslie et al. 2023; the scale and
        mask ride in baddbmm). On CPU this is several times cheaper than
        scaled_dot_product_attention with a mask for a single query."""
        b, hk, d, t = k.shape
        g = self.heads // hk
        qg = q.reshape(b * hk, g, d)
        scores = torch.baddbmm(bias, qg, k.reshape(b * hk, d, t),
                               alpha=self.scales[i])                       # [b*hk,g,T]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        out = torch.bmm(probs, v.reshape(b * hk, t, d))                      # [b*hk,g,d]
        return out.view(b, 1, self.heads * d)

    # -- passes ---------------------------------------------------------------------------
    def prefill(self, tokens: torch.Tensor, lens: torch.Tensor,
                slot_idx: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts tokens [n, t] (real lengths `lens`) into the cache rows
        `slot_idx` at positions 0..t-1; returns the logits [n, V] at each last real token.
        Padding sits after the real tokens, so causal attention never lets a real token see
        it, and the decode steps overwrite it."""
        n, t = tokens.shape
        pos = torch.arange(t, device=tokens.device).expand(n, t)
        x = self._embed(tokens, pos)
        rot = self._rot(pos)
        ar = torch.arange(t, device=tokens.device)
        back = ar[:, None] - ar[None, :]                    # query position - key position
        masks = {w: (back >= 0) & ((back < w) if w else True) for w in set(self.windows)}
        for i in range(self.layers):
            q, k, v = self._qkv(x, i, rot)
            self.k[i, slot_idx, :, :, :t] = k.transpose(-1, -2)
            self.v[i, slot_idx, :, :t] = v
            x = self._lin(self._attend(q, k, v, masks[self.windows[i]], i), f"{i}.o_w",
                          residual=x)
            x = self._mlp(x, i)
        last = x[torch.arange(n, device=x.device), lens - 1]
        return self._logits(last)

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first `length` cache positions of slots src into slots dst."""
        self.k[:, dst, :, :, :length] = self.k[:, src, :, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One decode step for slots 0..b-1 (b = len(tok)): token tok[s] at position
        pos[s] of slot s, attending to the slot's cache positions <= pos[s] (of the first
        `kv_len`). Returns logits [b, V]. Static shapes for a fixed (b, kv_len): this is
        what a CUDA graph captures."""
        b = tok.shape[0]
        rows = torch.arange(b, device=tok.device)
        x = self._embed(tok[:, None], pos[:, None])
        rot = self._rot(pos[:, None])
        back = pos[:, None] - torch.arange(kv_len, device=tok.device)          # [b, T]
        biases = {}
        for w in set(self.windows):
            visible = (back >= 0) & ((back < w) if w else True)
            bias = torch.zeros(b, kv_len, dtype=self.dtype, device=tok.device)
            bias = bias.masked_fill_(~visible, float("-inf"))
            biases[w] = bias.repeat_interleave(self.kv_heads, dim=0)[:, None]  # [b*hk,1,T]
        for i in range(self.layers):
            bias = biases[self.windows[i]]
            q, k, v = self._qkv(x, i, rot)
            self.k[i, rows, :, :, pos] = k[:, :, 0]
            self.v[i, rows, :, pos] = v[:, :, 0]
            keys, vals = self.k[i, :b, :, :, :kv_len], self.v[i, :b, :, :kv_len]
            x = self._lin(self._attend_one(q, keys, vals, bias, i), f"{i}.o_w", residual=x)
            x = self._mlp(x, i)
        return self._logits(x[:, 0])
