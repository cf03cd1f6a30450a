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

Same function as the Hugging Face module (tests/test_fast_forward.py compares log-probs
and gradients): RMSNorm (Zhang & Sennrich 2019), rotary embeddings (Su et al. 2021),
SwiGLU (Shazeer 2020), Llama (Touvron et al. 2023). `supported(module)` says whether a
module has this shape (Llama, SiLU, default rope, no biases); others use the HF path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fast_ops import QKVRope, RMSNormalize, SwiGLU, TokenLogProbs


def supported(module: nn.Module) -> bool:
    """Whether fast_logprobs runs this module: a float32/float64 Llama causal LM with SiLU,
    no biases and the default (unscaled) rotary embedding."""
    cfg = module.config
    if cfg.model_type != "llama" or not hasattr(module, "lm_head"):
        return False
    if module.lm_head.weight.dtype not in (torch.float32, torch.float64):
        return False
    rope = getattr(module.model, "rotary_emb", None)
    return (getattr(cfg, "hidden_act", "silu") == "silu"
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and rope is not None and float(getattr(rope, "attention_scaling", 1.0)) == 1.0
            and getattr(rope, "rope_type", "default") == "default"
            and (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
            % 2 == 0)


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

    def __init__(self, module: nn.Module):
        cfg = module.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or self.heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.d ** -0.5
        dev = module.lm_head.weight.device
        rows = torch.cat([interleave_rows(self.heads, self.d, dev),
                          self.heads * self.d + interleave_rows(self.kv_heads, self.d, dev)])
        self.qk_rows = rows

    def qkv(self, layer: nn.Module) -> torch.Tensor:
        a = layer.self_attn
        qk = torch.cat([a.q_proj.weight, a.k_proj.weight]).index_select(0, self.qk_rows)
        return torch.cat([qk, a.v_proj.weight]) * layer.input_layernorm.weight

    @staticmethod
    def gate_up(layer: nn.Module) -> torch.Tensor:
        f = layer.mlp
        return torch.cat([f.gate_proj.weight, f.up_proj.weight]) \
            * layer.post_attention_layernorm.weight


def hidden_states(module: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """The final hidden states [B, T, E] (before the final norm) of left-padded rows."""
    lay = _Layout(module)
    body = module.model
    b, t = tokens.shape
    x = F.embedding(tokens, body.embed_tokens.weight).view(b * t, -1)
    rope = _rope(module, pos, x.dtype)
    attn_mask = _attention_mask(mask)
    gqa = lay.kv_heads != lay.heads
    for layer in body.layers:
        xh = RMSNormalize.apply(x, lay.eps).view(b, t, -1)
        q, k, v = QKVRope.apply(xh, lay.qkv(layer), rope, lay.heads, lay.kv_heads)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=attn_mask,
                                           is_causal=attn_mask is None, scale=lay.scale,
                                           enable_gqa=gqa)
        o = o.transpose(1, 2).reshape(b * t, -1)
        x = torch.addmm(x, o, layer.self_attn.o_proj.weight.t())
        xh = RMSNormalize.apply(x, lay.eps)
        a = SwiGLU.apply(torch.mm(xh, lay.gate_up(layer).t()))
        x = torch.addmm(x, a, layer.mlp.down_proj.weight.t())
    return x.view(b, t, -1)


def fast_logprobs(module: nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [B, T] of left-padded rows, as HFEngine._head computes them:
    out[:, t] = log p(tokens[:, t] | tokens[:, :t]), out[:, 0] = 0."""
    b, t = tokens.shape
    x = hidden_states(module, tokens, mask, pos)
    eps = module.config.rms_norm_eps
    xh = RMSNormalize.apply(x.view(b * t, -1), eps)
    head = module.lm_head.weight * module.model.norm.weight
    logits = torch.mm(xh, head.t())
    # the last position's target is a dummy (its log-prob is dropped)
    target = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).reshape(-1)
    lp = TokenLogProbs.apply(logits, target).view(b, t)
    return F.pad(lp[:, :-1], (1, 0))


__all__ = ["supported", "fast_logprobs", "hidden_states", "interleave_rows"]
