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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNormalize(torch.autograd.Function):
    """y = x * r, r = rsqrt(mean(x^2, -1) + eps). Backward: with y saved,
    dx = r * (dy - y * mean(dy * y, -1)) (the derivative of x / rms(x))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:   # type: ignore[override]
        h = x.shape[-1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        sq = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc)
        r = torch.rsqrt(sq.square_().div_(h).add_(eps))
        y = x * r.to(x.dtype)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):   # type: ignore[override]
        y, r = ctx.saved_tensors
        c = torch.linalg.vecdot(dy, y).unsqueeze(-1).div_(-y.shape[-1])
        return torch.addcmul(dy, y, c).mul_(r.to(dy.dtype)), None


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
        qk = torch.view_as_real(_complex(qk) * rope).flatten(-2)     # [N, H+K, d]
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
        for g, lo, n in ((dq, 0, heads), (dk, hq, kv_heads)):
            out = _complex(grad[:, lo:lo + n * d].unflatten(-1, (n, d)))
            if g is None:
                out.zero_()
            else:
                torch.mul(_complex(g.contiguous() if g.stride(-1) != 1 else g), back, out=out)
        if dv is None:
            grad[:, hq + hk:].zero_()
        else:
            grad[:, hq + hk:].copy_(dv.flatten(-2))
        dxh = torch.mm(grad, w) if ctx.needs_input_grad[0] else None
        dw = grad.t().mm(xh) if ctx.needs_input_grad[1] else None
        n = len(ctx.needs_input_grad)      # 5 when called without a bias
        db = grad.sum(0) if n > 5 and ctx.needs_input_grad[5] else None
        return (dxh, dw, None, None, None, db)[:n]


class TokenLogProbs(torch.autograd.Function):
    """log_softmax(logits)[n, target[n]] for logits [N, V]. Backward:
    dlogits = g * (onehot(target) - softmax(logits)), from the saved log-softmax."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:   # type: ignore[override]
        lp = torch.log_softmax(logits, dim=-1)
        ctx.save_for_backward(lp, target)
        return lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):   # type: ignore[override]
        lp, target = ctx.saved_tensors
        g = g.unsqueeze(-1)
        d = lp.exp().mul_(g.neg())
        d.scatter_add_(-1, target.unsqueeze(-1), g)
        return d, None


__all__ = ["RMSNormalize", "SwiGLU", "QKVRope", "TokenLogProbs"]
