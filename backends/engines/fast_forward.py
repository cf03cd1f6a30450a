"""The fast engine's differentiable forward for Llama-shaped causal LMs: per-token
log-probs over the Hugging Face module's own parameters (so training updates the same
weights that export, checkpoints and the decode model read), with fewer, fused kernels:

- one q/k/v matmul and one gate/up matmul per layer (weights concatenated each call;
  autograd splits their gradients back onto the module's parameters);
- RMSNorm weights folded into the next projection's columns (W diag(w)), leaving only the
  weight-free normalisation on activations (fast_ops.RMSNormalize);
- rotary embeddings as one complex multiply on pair-interleaved q/k rows (rows permuted
  per head once per call; q.k is unchanged by a shared permutation), angles computed once
  per call for all layers (fast_ops.QKVRope);
- residual adds folded into the output projections (addmm), SwiGLU with a closed-form
  backward (fast_ops.SwiGLU), log-probs without a one-hot (fast_ops.TokenLogProbs).

Same function as the Hugging Face module (tests/test_fast_forward.py and
tests/test_fast_families.py compare log-probs and gradients): RMSNorm (Zhang & Sennrich
2019), rotary embeddings (Su et al. 2021), SwiGLU (Shazeer 2020), Llama (Touvron et al.
2023). `supported(module)` says whether a module runs here; others use the HF path.
Per architecture feature (graphrl.architecture):

- Llama-2 / Mistral / Qwen2 / Qwen3 causal LMs with SiLU: run here;
- rope_type llama3: run here (the angles come from the module's own `inv_freq` buffer,
  which holds the Llama 3.1 scaled frequencies); other rope scalings: HF path;
- q/k/v biases (Qwen2, attention_bias): in QKVRope, permuted like their rows; o_proj and
  MLP biases (attention_bias, mlp_bias): added after their projections;
- q/k RMSNorm (Qwen3): between the projection and the rotation, so not folded: q/k/v
  through a plain matmul, RMSNormalize per head, the norm weights (permuted like the
  rows) and the rotation under autograd (_qk_normed);
- head_dim != hidden / heads (Qwen3): run here; tied embeddings: run here (lm_head is
  the embedding parameter, autograd sums both uses);
- sliding-window attention (a window shorter than the context): HF path.

Precision (`dtype`, the compute dtype; default the module's): fp32 / float64 compute in
their dtype. bf16 over fp32 master weights is bf16 mixed precision without autocast: each
fused, norm-folded weight is cast to bf16 once per call (autograd casts its gradient
back, so weight gradients accumulate in the fp32 masters' .grad); matmuls and the
activations between them (q/k/v, SwiGLU, logits) in bf16; the residual stream stays in
fp32 (as HF's residual adds do under bf16 autocast); RMSNorm statistics and
normalisation, the rotary multiply (bf16 has no complex view) and log-softmax with the
target gather, and their backwards, in fp32; attention in fp32 on CPU (its bf16 backward
is ~3x slower there), bf16 elsewhere; log-probs fp32. A model held in bf16 (frozen) runs
the same with its bf16 weights as they are and a bf16 residual stream (as HF runs it).
tests/test_precision.py and tests/test_fast_families.py check it against HF's bf16
autocast and fp32.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fast_ops import QKVRope, RMSNormalize, SwiGLU, TokenLogProbs


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def supported(module: nn.Module) -> bool:
    """Whether fast_logprobs runs this module: a float32/float64/bfloat16 Llama-family causal LM
    (llama, mistral, qwen2, qwen3) with SiLU, the default or llama3 rotary embedding and
    no sliding window (see the module doc)."""
    cfg = module.config
    if cfg.model_type not in LLAMA_TYPES or not hasattr(module, "lm_head"):
        return False
    if module.lm_head.weight.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return False
    rope = getattr(module.model, "rotary_emb", None)
    return (getattr(cfg, "hidden_act", "silu") == "silu"
            and rope is not None and float(getattr(rope, "attention_scaling", 1.0)) == 1.0
            and getattr(rope, "rope_type", "default") in ("default", "llama3")
            and not any(sliding_windows(cfg, cfg.num_hidden_layers))
            and (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
            % 2 == 0)


def sliding_windows(config: Any, layers: int) -> list[int]:
    """Each layer's attention window (0: full attention), as Hugging Face's modules apply
    it: Mistral's `sliding_window` on every layer; Qwen2/Qwen3's on the layers that
    `layer_types` marks "sliding_attention" (their configs set it from use_sliding_window
    and max_window_layers). A query at position i sees keys j with i - window < j <= i
    (transformers' sliding_window_overlay)."""
    window = getattr(config, "sliding_window", None) or 0
    if config.model_type == "gpt2" or not window:
        return [0] * layers
    types = getattr(config, "layer_types", None)
    if config.model_type == "mistral" or types is None:
        return [int(window)] * layers
    return [int(window) if t == "sliding_attention" else 0 for t in types]


def interleave_rows(heads: int, d: int, device: torch.device) -> torch.Tensor:
    """Row order that turns each head's halves [x_0..x_{d/2-1} | x_{d/2}..x_{d-1}]
    (Hugging Face's rotate_half layout) into pairs (x_j, x_{j+d/2}): the real and
    imaginary parts of one complex number rotated by angle pos * theta_j."""
    half = torch.arange(d // 2, device=device)
    one = torch.stack([half, half + d // 2], dim=-1).reshape(-1)
    return (torch.arange(heads, device=device)[:, None] * d + one).reshape(-1)


def _rope(module: nn.Module, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e^{i pos theta_j} as complex [B, T, 1, d/2] of real dtype `dtype`, theta from the
    module's own buffer; angles in float32 as Hugging Face computes them."""
    inv = module.model.rotary_emb.inv_freq.float()
    ang = pos.float().unsqueeze(-1) * inv
    rot = torch.polar(torch.ones_like(ang), ang)
    if dtype == torch.float64:
        rot = rot.to(torch.complex128)
    return rot.unsqueeze(2)


def _attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None when every token is real (plain causal attention), else a bool [B, 1, T, T]:
    causal over real keys; a padding query also sees itself (no all-masked row, no NaN;
    its outputs are unused)."""
    if bool(mask.all()):
        return None
    t = mask.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    allowed = causal & mask.bool()[:, None, None, :]
    return allowed | torch.eye(t, dtype=torch.bool, device=mask.device)


class _Layout:
    """A Llama config's sizes and the fused weights of one call."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
        cfg = module.config
        # the compute dtype of matmuls and activations; the residual stream stays in the
        # held weights' dtype (fp32 masters under bf16 compute: as bf16 autocast runs HF)
        self.dtype = dtype or module.lm_head.weight.dtype
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or self.heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.d ** -0.5
        dev = module.lm_head.weight.device
        rows = torch.cat([interleave_rows(self.heads, self.d, dev),
                          self.heads * self.d + interleave_rows(self.kv_heads, self.d, dev)])
        self.qk_rows = rows
        self.pair = interleave_rows(1, self.d, dev)
        self.qk_norm = getattr(module.model.layers[0].self_attn, "q_norm", None) is not None

    def qkv(self, layer: nn.Module) -> torch.Tensor:
        a = layer.self_attn
        qk = torch.cat([a.q_proj.weight, a.k_proj.weight]).index_select(0, self.qk_rows)
        return self.cast(torch.cat([qk, a.v_proj.weight]) * layer.input_layernorm.weight)

    def cast(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """t in the compute dtype (once per call; autograd casts its gradient back to
        the fp32 master's dtype, where it accumulates)."""
        return None if t is None else t.to(self.dtype)

    def qkv_bias(self, layer: nn.Module) -> torch.Tensor | None:
        """The q/k/v biases in the fused weight's row order, or None."""
        a = layer.self_attn
        if a.q_proj.bias is None:
            return None
        qk = torch.cat([a.q_proj.bias, a.k_proj.bias]).index_select(0, self.qk_rows)
        return self.cast(torch.cat([qk, a.v_proj.bias]))

    def qk_norm_weight(self, layer: nn.Module) -> torch.Tensor:
        """Qwen3's q_norm / k_norm weights per head [H+K, d], pair-interleaved."""
        a = layer.self_attn
        w = torch.cat([a.q_norm.weight.expand(self.heads, self.d),
                       a.k_norm.weight.expand(self.kv_heads, self.d)])
        return self.cast(w.index_select(1, self.pair))

    def gate_up(self, layer: nn.Module) -> torch.Tensor:
        f = layer.mlp
        return self.cast(torch.cat([f.gate_proj.weight, f.up_proj.weight])
                         * layer.post_attention_layernorm.weight)

    def project(self, x: torch.Tensor, a: torch.Tensor, w: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """x + a w^T (+ bias): the residual add of an output projection, one addmm
        when the residual is in the compute dtype; else the bf16 product added to the
        fp32 residual (and the bias in fp32)."""
        w = self.cast(w)
        if x.dtype == self.dtype:
            x = torch.addmm(x, a, w.t())
            return x if bias is None else x + bias.to(x.dtype)
        y = torch.mm(a, w.t())
        return (x + y) if bias is None else (x + bias).add_(y)


class SharedPrefix:
    """Rows that share their first `p` columns (tokens and mask): a GRPO group's samples
    of one prompt. `first` [U]: one row per distinct prefix; `inverse` [B]: each row's
    prefix. The prefix runs once per distinct prompt and its keys/values are reused by
    every row's later positions: the same function (a causal LM's prefix positions never
    see later ones), fewer FLOPs (vLLM-style prefix sharing, Kwon et al. 2023, applied to
    scoring and training), gradients of the shared part summed by autograd."""

    def __init__(self, p: int, first: torch.Tensor, inverse: torch.Tensor):
        self.p, self.first, self.inverse = p, first, inverse

    @staticmethod
    def find(tokens: torch.Tensor, mask: torch.Tensor,
             response_mask: torch.Tensor | None) -> "SharedPrefix | None":
        """The prefix before the first response column, if at most half the rows have a
        distinct one; else None (nothing worth sharing)."""
        if response_mask is None or tokens.shape[0] < 2:
            return None
        cols = response_mask.bool().any(0).nonzero()
        if cols.numel() == 0 or int(cols[0, 0]) < 1:
            return None
        p = int(cols[0, 0])
        key = torch.cat([tokens[:, :p], mask[:, :p].long()], dim=1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        if 2 * uniq.shape[0] > tokens.shape[0]:
            return None
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        first = torch.full((uniq.shape[0],), tokens.shape[0], device=tokens.device)
        first = first.scatter_reduce(0, inverse, rows, "amin")
        return SharedPrefix(p, first, inverse)


def _layers(module: nn.Module, lay: _Layout, x: torch.Tensor, rope: torch.Tensor,
            attend: Any) -> torch.Tensor:
    """Run the decoder layers on token rows x [N, E]; attend(q, k, v) -> [N, H*d]."""
    for layer in module.model.layers:
        xh = RMSNormalize.apply(x, lay.eps, lay.dtype)
        if lay.qk_norm:
            q, k, v = _qk_normed(lay, layer, xh, rope)
        else:
            q, k, v = QKVRope.apply(xh, lay.qkv(layer), rope, lay.heads, lay.kv_heads,
                                    lay.qkv_bias(layer))
        o = layer.self_attn.o_proj
        x = lay.project(x, attend(q, k, v), o.weight, o.bias)
        xh = RMSNormalize.apply(x, lay.eps, lay.dtype)
        f = layer.mlp
        gu = torch.mm(xh, lay.gate_up(layer).t())
        if f.gate_proj.bias is not None:
            gu = gu + lay.cast(torch.cat([f.gate_proj.bias, f.up_proj.bias]))
        x = lay.project(x, SwiGLU.apply(gu), f.down_proj.weight, f.down_proj.bias)
    return RMSNormalize.apply(x, lay.eps, lay.dtype)


def _qk_normed(lay: _Layout, layer: nn.Module, xh: torch.Tensor, rope: torch.Tensor):
    """q [N, H, d], k and v [N, K, d] with Qwen3's per-head RMSNorm of q and k between
    the projection and the rotation (not foldable into the projection)."""
    qkv = torch.mm(xh, lay.qkv(layer).t())
    bias = lay.qkv_bias(layer)
    if bias is not None:
        qkv = qkv + bias
    split = (lay.heads + lay.kv_heads) * lay.d
    qk = qkv[:, :split].unflatten(-1, (lay.heads + lay.kv_heads, lay.d))
    qk = RMSNormalize.apply(qk, lay.eps) * lay.qk_norm_weight(layer)
    if qk.dtype == torch.bfloat16:   # no complex bf16: the rotation in fp32
        qk = qk.float()
    qk = torch.view_as_real(torch.view_as_complex(qk.unflatten(-1, (-1, 2))) * rope)
    qk = qk.flatten(-2).to(lay.dtype)
    return qk[:, :lay.heads], qk[:, lay.heads:], qkv[:, split:].unflatten(-1, (lay.kv_heads, lay.d))


def _sdpa(lay: _Layout, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [B, T, H, d] over k, v [B, S, K, d] -> [B*T, H*d]; mask None means
    plain causal (T == S)."""
    b, t = q.shape[:2]
    dtype = q.dtype
    if dtype == torch.bfloat16 and q.device.type == "cpu":
        # CPU's bf16 flash-attention backward is ~3x slower than its fp32 one (measured:
        # torch 2.13 CPU, AVX512-BF16; 3M Llama, 64 x 70 tokens: 63 vs 20 ms a layer):
        # attention in fp32 there, its output rounded to bf16 (CUDA: bf16 attention)
        q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                       v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, scale=lay.scale,
                                       enable_gqa=lay.kv_heads != lay.heads)
    return o.transpose(1, 2).reshape(b * t, -1).to(dtype)


def _logprobs(module: nn.Module, lay: _Layout, xh: torch.Tensor,
              target: torch.Tensor) -> torch.Tensor:
    """log p(target) [N] at normalised final hidden rows xh [N, E] (norm weight folded
    into the head); logits in the compute dtype, log-softmax in fp32 (fp32 out)."""
    head = lay.cast(module.lm_head.weight * module.model.norm.weight)
    return TokenLogProbs.apply(torch.mm(xh, head.t()), target)


def fast_logprobs(module: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                  pos: torch.Tensor, response_mask: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-token log-probs [B, T] of left-padded rows, as HFEngine._head computes them:
    out[:, t] = log p(tokens[:, t] | tokens[:, :t]), out[:, 0] = 0. With a response mask
    whose rows share their prompt (SharedPrefix), each prompt runs once. `dtype`: the
    compute dtype (default the module's; torch.bfloat16 over fp32 weights is bf16 mixed
    precision, see the module doc); the log-probs are fp32 (float64 for float64)."""
    shared = SharedPrefix.find(tokens, mask, response_mask)
    if shared is not None:
        return _shared_logprobs(module, tokens, mask, pos, shared, dtype)
    lay = _Layout(module, dtype)
    b, t = tokens.shape
    x = F.embedding(tokens, module.model.embed_tokens.weight).view(b * t, -1)
    attn_mask = _attention_mask(mask)

    def attend(q, k, v):
        return _sdpa(lay, q.unflatten(0, (b, t)), k.unflatten(0, (b, t)),
                     v.unflatten(0, (b, t)), attn_mask)

    xh = _layers(module, lay, x, _rope(module, pos, x.dtype).flatten(0, 1), attend)
    # the last position's target is a dummy (its log-prob is dropped)
    target = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).reshape(-1)
    lp = _logprobs(module, lay, xh, target).view(b, t)
    return F.pad(lp[:, :-1], (1, 0))


def _shared_logprobs(module: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                     pos: torch.Tensor, shared: SharedPrefix,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """fast_logprobs with the prefix columns [:p] run once per distinct prefix: token
    rows are [U*p prefix rows | B*r rest rows]; the rest attend to their prefix's keys and
    values followed by their own (causal)."""
    lay = _Layout(module, dtype)
    b, t = tokens.shape
    p, first, inverse = shared.p, shared.first, shared.inverse
    u, r = first.shape[0], t - p
    rows = torch.cat([tokens[first, :p].reshape(-1), tokens[:, p:].reshape(-1)])
    x = F.embedding(rows, module.model.embed_tokens.weight)
    rot = torch.cat([_rope(module, pos[first, :p], x.dtype).flatten(0, 1),
                     _rope(module, pos[:, p:], x.dtype).flatten(0, 1)])
    pre_mask = _attention_mask(mask[first, :p])
    rest_real = mask[:, p:].bool()
    causal = torch.ones(r, r, dtype=torch.bool, device=tokens.device).tril()
    rest_mask = torch.cat([mask[:, None, None, :p].bool().expand(b, 1, r, p),
                           (causal & rest_real[:, None, None, :]) |
                           torch.eye(r, dtype=torch.bool, device=tokens.device)], dim=-1)
    n_pre = u * p

    def attend(q, k, v):
        kp, vp = k[:n_pre].unflatten(0, (u, p)), v[:n_pre].unflatten(0, (u, p))
        pre = _sdpa(lay, q[:n_pre].unflatten(0, (u, p)), kp, vp, pre_mask)
        keys = torch.cat([kp.index_select(0, inverse), k[n_pre:].unflatten(0, (b, r))], 1)
        vals = torch.cat([vp.index_select(0, inverse), v[n_pre:].unflatten(0, (b, r))], 1)
        rest = _sdpa(lay, q[n_pre:].unflatten(0, (b, r)), keys, vals, rest_mask)
        return torch.cat([pre, rest])

    xh = _layers(module, lay, x, rot, attend)
    pre_h = xh[:n_pre].view(u, p, -1)
    # prefix positions 0..p-2 predict prefix tokens (once per prefix); each row's last
    # prefix position and its own positions predict its own tokens p..t-1
    own = torch.cat([pre_h[:, -1].index_select(0, inverse)[:, None],
                     xh[n_pre:].view(b, r, -1)[:, :-1]], dim=1)
    lp = _logprobs(module, lay, torch.cat([pre_h[:, :-1].reshape(-1, pre_h.shape[-1]),
                                      own.reshape(b * r, -1)]),
                   torch.cat([tokens[first, 1:p].reshape(-1), tokens[:, p:].reshape(-1)]))
    pre_lp = lp[:u * (p - 1)].view(u, p - 1).index_select(0, inverse)
    return torch.cat([torch.zeros(b, 1, dtype=lp.dtype, device=lp.device), pre_lp,
                      lp[u * (p - 1):].view(b, r)], dim=1)


__all__ = ["supported", "fast_logprobs", "interleave_rows", "sliding_windows",
           "SharedPrefix"]
