"""Hand-fused operators with closed-form backward passes for the fast engine's training
forward (fast_forward): fewer kernels and fewer saved tensors than autograd through the
plain formulas, and gradients written straight into one buffer where autograd would cut
a fused projection's output into slices (a zero-filled copy per slice in backward).

- RMSNormalize: x * rsqrt(mean(x^2) + eps), RMSNorm (Zhang & Sennrich 2019) without its
  weight (fast_forward folds the weight into the next projection's columns).
- SwiGLU: silu(g) * u over the halves of one fused gate/up projection (Shazeer 2020).
- QKVRope: the fused q/k/v projection with rotary embeddings (Su et al. 2021) applied to
  q and k as one complex multiplication (their rows stored pair-interleaved, see
  fast_forward.interleave_rows); returns q, k, v as [B, T, heads, d] views.
- TokenLogProbs: log softmax(logits)[target] per row without a [N, V] one-hot.

Each backward is checked against autograd through the plain formula in float64
(tests/test_fast_forward.py).

bf16 mixed precision (fast_forward with compute dtype bf16): matmuls take and give bf16;
the RMS statistics, the normalisation and its backward, the rotary multiply (bf16 has no
complex view: upcast to complex64) and log-softmax with its backward compute in fp32 and
round their outputs to the activations' dtype once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions and fp32-kept operators compute in: float64 stays, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNormalize(torch.autograd.Function):
    """y = x * r, r = rsqrt(mean(x^2, -1) + eps), computed in fp32 (float64 for float64)
    and returned in `dtype` (default x's: bf16 activations from an fp32 residual stream,
    or from bf16 ones). Backward in fp32: with y saved,
    dx = r * (dy - y * mean(dy * y, -1)) (the derivative of x / rms(x)), in x's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float,   # type: ignore[override]
                dtype: torch.dtype | None = None) -> torch.Tensor:
        h = x.shape[-1]
        acc = _acc(x.dtype)
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
        r = torch.rsqrt(sq.square_().div_(h).add_(eps))
        y = (x * r) if x.dtype == acc else x.to(acc).mul_(r)
        y = y.to(dtype or x.dtype)
        ctx.save_for_backward(y, r)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):   # type: ignore[override]
        y, r = ctx.saved_tensors
        acc = r.dtype
        dy, y = dy.to(acc), y.to(acc)
        c = torch.linalg.vecdot(dy, y).unsqueeze(-1).div_(-y.shape[-1])
        return torch.addcmul(dy, y, c).mul_(r).to(ctx.x_dtype), None, None


class SwiGLU(torch.autograd.Function):
    """a = silu(g) * u for gu = [g | u] (the last dim's halves). Backward:
    du = da * silu(g), dg = da * u * silu'(g), written into one [.., 2I] gradient."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:   # type: ignore[override]
        g, u = gu.chunk(2, dim=-1)
        sg = F.silu(g)
        ctx.save_for_backward(gu, sg)
        return sg.mul(u)

    @staticmethod
    def backward(ctx, da: torch.Tensor):   # type: ignore[override]
        gu, sg = ctx.saved_tensors
        g, u = gu.chunk(2, dim=-1)
        d = torch.empty_like(gu)
        dg, du = d.chunk(2, dim=-1)
        torch.mul(da, sg, out=du)
        torch.ops.aten.silu_backward.grad_input(da * u, g, grad_input=dg)
        return d


def _complex(x: torch.Tensor) -> torch.Tensor:
    """A real [..., d] tensor (last dim contiguous, d even) seen as complex [..., d/2]."""
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)))


class QKVRope(torch.autograd.Function):
    """q, k, v of hidden states xh [N, E] (token rows) under the fused weight
    w [(H+2K)*d, E] (rows: q heads, k heads, v heads; q and k rows pair-interleaved), with
    q and k rotated by `rope` [N, 1, d/2] (complex unit numbers e^{i pos theta_j}): one
    complex multiply; `bias` [(H+2K)*d] (same row order) or None. Returns q [N, H, d], k
    and v [N, K, d]. Backward: the rotation's adjoint is the conjugate rotation; dq, dk,
    dv land in one [N, (H+2K)*d] buffer, then two matmuls give dxh and dw, its column sums
    the bias's gradient."""

    @staticmethod
    def forward(ctx, xh: torch.Tensor, w: torch.Tensor, rope: torch.Tensor,   # type: ignore[override]
                heads: int, kv_heads: int, bias: torch.Tensor | None = None):
        qkv = torch.mm(xh, w.t()) if bias is None else torch.addmm(bias, xh, w.t())
        d = qkv.shape[-1] // (heads + 2 * kv_heads)
        split = (heads + kv_heads) * d
        qk = qkv[:, :split].unflatten(-1, (heads + kv_heads, d))
        qk = torch.view_as_real(_complex(qk.to(_acc(qk.dtype))) * rope).flatten(-2)
        qk = qk.to(qkv.dtype)                                        # [N, H+K, d]
        v = qkv[:, split:].unflatten(-1, (kv_heads, d))
        ctx.save_for_backward(xh, w, rope)
        ctx.heads, ctx.kv_heads, ctx.d = heads, kv_heads, d
        return qk[:, :heads], qk[:, heads:], v

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):   # type: ignore[override]
        xh, w, rope = ctx.saved_tensors
        heads, kv_heads, d = ctx.heads, ctx.kv_heads, ctx.d
        grad = torch.empty(xh.shape[0], w.shape[0], dtype=xh.dtype, device=xh.device)
        hq, hk = heads * d, kv_heads * d
        back = rope.conj()
        acc = _acc(grad.dtype)
        for g, lo, n in ((dq, 0, heads), (dk, hq, kv_heads)):
            part = grad[:, lo:lo + n * d].unflatten(-1, (n, d))
            if g is None:
                part.zero_()
            elif acc == grad.dtype:
                torch.mul(_complex(g.contiguous() if g.stride(-1) != 1 else g), back,
                          out=_complex(part))
            else:   # bf16: the conjugate rotation in fp32, rounded once into the buffer
                part.copy_(torch.view_as_real(_complex(g.to(acc)) * back).flatten(-2))
        if dv is None:
            grad[:, hq + hk:].zero_()
        else:
            grad[:, hq + hk:].copy_(dv.flatten(-2))
        dxh = torch.mm(grad, w) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(xh) if ctx.needs_input_grad[1] else None
        n = len(ctx.needs_input_grad)      # 5 when called without a bias
        db = (grad.sum(0, dtype=_acc(grad.dtype)).to(grad.dtype)
              if n > 5 and ctx.needs_input_grad[5] else None)
        return (dxh, dw, None, None, None, db)[:n]


class TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits)[n, target[n]] for logits [N, V], in fp32 (float64 for float64
    logits; bf16 logits are upcast) and returned in fp32. Backward in fp32:
    dlogits = g * (onehot(target) - softmax(logits)), from the saved log-softmax, rounded
    to the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:   # type: ignore[override]
        lp = torch.log_softmax(logits, dim=-1, dtype=_acc(logits.dtype))
        ctx.save_for_backward(lp, target)
        ctx.logits_dtype = logits.dtype
        return lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):   # type: ignore[override]
        lp, target = ctx.saved_tensors
        g = g.to(lp.dtype).unsqueeze(-1)
        d = lp.exp().mul_(g.neg())
        d.scatter_add_(-1, target.unsqueeze(-1), g)
        return d.to(ctx.logits_dtype), None


__all__ = ["RMSNormalize", "SwiGLU", "QKVRope", "TokenLogProbs"]
