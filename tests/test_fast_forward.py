"""The fast engine's fused training forward: each hand-written backward (fast_ops) against
autograd through the plain formula in float64, and fast_forward's log-probs, gradients and
train steps against the Hugging Face engine (padding, GQA, a GPT-2 fallback)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import graphrl as gr
from graphrl.backends.engines.fast_forward import fast_logprobs, interleave_rows
from graphrl.backends.engines.fast_ops import QKVRope, RMSNormalize, SwiGLU, TokenLogProbs
from graphrl.backends.engines.hf import HFEngine, positions
from graphrl.backends.engines.registry import create_engine

D64 = dict(dtype=torch.float64)


def _same_grads(fused, plain, inputs, seed=0):
    """Values and input gradients of fused(*inputs) equal plain(*inputs) (float64)."""
    g = torch.Generator().manual_seed(seed)
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    ys = [x.detach().clone().requires_grad_(True) for x in inputs]
    a, b = fused(*xs), plain(*ys)
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    outs = [torch.randn(o.shape, generator=g, **D64) for o in b]
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-12, rtol=1e-10)
    torch.autograd.backward(a, outs)
    torch.autograd.backward(b, outs)
    for u, v in zip(xs, ys):
        assert torch.allclose(u.grad, v.grad, atol=1e-10, rtol=1e-8)
    assert torch.autograd.gradcheck(fused, tuple(xs), eps=1e-6, atol=1e-7)


def test_rms_normalize_backward():
    x = torch.randn(3, 5, 8, **D64)
    _same_grads(lambda x: RMSNormalize.apply(x, 1e-6),
                lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), [x])


def test_swiglu_backward():
    gu = torch.randn(4, 3, 12, **D64)
    _same_grads(SwiGLU.apply, lambda gu: F.silu(gu[..., :6]) * gu[..., 6:], [gu])


def test_token_logprobs_backward():
    logits = torch.randn(7, 5, **D64)
    target = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    _same_grads(lambda z: TokenLogProbs.apply(z, target),
                lambda z: torch.log_softmax(z, -1).gather(-1, target[:, None])[:, 0], [logits])


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_rope_backward(kv_heads, with_bias):
    """The interleaved complex rotation == Hugging Face's rotate_half formula on the
    un-permuted rows, q and k; v untouched; a q/k/v bias (Qwen2) permuted with its rows."""
    b, t, e, heads, d = 2, 5, 6, 2, 4
    xh = torch.randn(b, t, e, **D64)
    w = torch.randn((heads + 2 * kv_heads) * d, e, **D64)
    bias = torch.randn((heads + 2 * kv_heads) * d, **D64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])
    theta = 1.0 / 10000 ** (torch.arange(0, d, 2, **D64) / d)
    ang = pos[..., None] * theta
    rope = torch.polar(torch.ones_like(ang), ang)[:, :, None]
    rows = torch.cat([interleave_rows(heads, d, xh.device),
                      heads * d + interleave_rows(kv_heads, d, xh.device),
                      torch.arange((heads + kv_heads) * d, (heads + 2 * kv_heads) * d)])
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, :, None]

    def plain(xh, w, *bias):
        qkv = xh @ w.t() + (bias[0] if bias else 0)
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)

        def rot(x, n):
            x = x.unflatten(-1, (n, d))
            half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
            # back to the interleaved row order the fused op works in
            return (x * cos + half * sin)[..., interleave_rows(1, d, x.device)]
        return rot(q, heads), rot(k, kv_heads), v.unflatten(-1, (kv_heads, d))

    def fused(xh, w, *bias):
        args = (heads, kv_heads) + ((bias[0][rows],) if bias else ())
        q, k, v = QKVRope.apply(xh.reshape(b * t, e), w[rows], rope.reshape(b * t, 1, -1),
                                *args)
        return q.unflatten(0, (b, t)), k.unflatten(0, (b, t)), v.unflatten(0, (b, t))

    _same_grads(fused, plain, [xh, w] + ([bias] if with_bias else []))


def _decl(family="llama", kv=2, head="lm"):
    spec = gr.ModelSpec(family, 32, 64, 2, 4, kv, 128, 64, head, dtype="fp32")
    return gr.ModelDecl("m", spec, "policy", True, "fast")


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 32, (6, 12), generator=g)
    att = torch.ones(6, 12)
    att[1::2, :3] = 0            # left padding on odd rows
    resp = torch.zeros(6, 12)
    resp[:, 7:] = 1
    return tokens, att, resp


def _assert_same_logprobs_and_grads(hf, a, b, keep):
    """Log-probs a (HF) and b (fused) agree at `keep`, and so do the gradients of a
    weighted sum of them with respect to every parameter of hf.module."""
    assert (a - b)[keep].abs().max() < 1e-5
    grads = []
    for out in (a, b):
        hf.module.zero_grad()
        (out[keep] * torch.linspace(-1, 1, int(keep.sum()))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in hf.module.named_parameters()})
    for n, ga in grads[0].items():
        assert (ga - grads[1][n]).abs().max() <= 1e-5 * (1 + ga.abs().max()), n


@pytest.mark.parametrize("kv", [4, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_logprobs_and_gradients_match_hf(kv, padded):
    hf = HFEngine(_decl(kv=kv), {}, seed=0)
    tokens, att, _ = _batch()
    if not padded:
        att = torch.ones_like(att)
    keep = (att * F.pad(att[:, :-1], (1, 0))) > 0     # real positions read from real ones
    a = hf._head({"tokens": tokens, "attention_mask": att})
    b = fast_logprobs(hf.module, tokens, att.long(), positions(att.long()))
    _assert_same_logprobs_and_grads(hf, a, b, keep)


def test_fast_engine_trains_like_hf():
    """Three GRPO steps: the fused forward's weights track the HF engine's."""
    hf = HFEngine(_decl(), {}, seed=0)
    fast = create_engine("fast", _decl(), {}, "cpu", 0)
    assert fast.fused_forward
    fast.load_weights(hf.export_weights())
    start = hf.export_weights()
    tokens, att, resp = _batch()
    rollout = {"tokens": tokens, "attention_mask": att, "response_mask": resp * att}
    inputs = {"rollout": rollout, "ref_logprobs": {"logprobs": torch.zeros(6, 12) - 3.0},
              "advantages": {"advantages": torch.linspace(-1, 1, 6)[:, None].expand(6, 12)}}
    for step in range(3):
        s1 = hf.train(inputs, loss="grpo", seed=step, kl_coef=0.1)
        s2 = fast.train(inputs, loss="grpo", seed=step, kl_coef=0.1)
        assert s1["loss"] == pytest.approx(s2["loss"], abs=1e-5)
    wa, wb = hf.export_weights(), fast.export_weights()
    diff = torch.cat([(wa[k] - wb[k]).flatten() for k in wa]).norm()
    moved = torch.cat([(wa[k] - start[k]).flatten() for k in wa]).norm()
    assert diff < 1e-3 * moved, (float(diff), float(moved))


def test_other_models_use_the_hf_forward():
    """GPT-2 and value heads are not Llama LMs: the fast engine scores them as HF does."""
    assert not create_engine("fast", _decl("gpt2", 4), {}, "cpu", 0).fused_forward
    assert not create_engine("fast", _decl(head="value"), {}, "cpu", 0).fused_forward
    assert not create_engine("fast", _decl(), {"fused_forward": False}, "cpu", 0).fused_forward


@pytest.mark.parametrize("kv", [4, 2])
def test_shared_prompts_run_once_with_the_same_result(kv):
    """Rows repeating their prompt (a GRPO group), left-padded prompts, responses ending
    early: log-probs and gradients as HF computes them row by row."""
    hf = HFEngine(_decl(kv=kv), {}, seed=0)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(1, 32, (3, 5), generator=g).repeat_interleave(4, dim=0)
    att = torch.ones(12, 11)
    att[4:8, :2] = 0                      # the second prompt is left-padded
    att[::3, 8:] = 0                      # some responses stop early
    tokens = torch.cat([prompts, torch.randint(1, 32, (12, 6), generator=g)], 1)
    tokens = torch.where(att.bool(), tokens, 0)
    resp = torch.zeros(12, 11)
    resp[:, 5:] = att[:, 5:]
    from graphrl.backends.engines.fast_forward import SharedPrefix
    shared = SharedPrefix.find(tokens, att.long(), resp)
    assert shared is not None and shared.p == 5 and shared.first.numel() == 3
    keep = (att * F.pad(att[:, :-1], (1, 0))) > 0
    a = hf._head({"tokens": tokens, "attention_mask": att})
    b = fast_logprobs(hf.module, tokens, att.long(), positions(att.long()), resp)
    _assert_same_logprobs_and_grads(hf, a, b, keep)


def test_fused_ops_in_bf16_keep_their_reductions_in_fp32():
    """Each op on bf16 inputs against the float64 formula: outputs and input gradients in
    the inputs' dtype (log-probs fp32), within bf16 rounding (8 mantissa bits: ~4e-3
    relative per rounding; measured relative errors 6e-4 to 3.8e-3, bound 2e-2)."""
    g = torch.Generator().manual_seed(0)
    b, t, e, heads, kv, d = 2, 5, 16, 2, 1, 8
    x = torch.randn(b * t, e, generator=g, **D64)
    w = torch.randn((heads + 2 * kv) * d, e, generator=g, **D64) / 4
    gu = torch.randn(b * t, 12, generator=g, **D64)
    logits = torch.randn(b * t, 7, generator=g, **D64)
    target = torch.randint(0, 7, (b * t,), generator=g)
    ang = torch.arange(b * t, **D64)[:, None, None] / 10 ** torch.arange(d // 2, **D64)
    rope = torch.polar(torch.ones_like(ang), ang)

    def rel(u, v):
        return float((u.detach().double() - v.detach()).norm() / v.detach().norm())

    cases = [
        (lambda x: RMSNormalize.apply(x, 1e-6), [x], torch.bfloat16),
        (lambda x: RMSNormalize.apply(x, 1e-6, torch.bfloat16 if x.dtype == torch.float32
                                      else None), [x], torch.bfloat16),
        (SwiGLU.apply, [gu], torch.bfloat16),
        (lambda z: TokenLogProbs.apply(z, target), [logits], torch.float32),
        (lambda x, w: QKVRope.apply(x, w, rope.to(torch.complex64 if x.dtype != torch.float64
                                                  else torch.complex128), heads, kv),
         [x, w], torch.bfloat16),
    ]
    for i, (op, inputs, out_dtype) in enumerate(cases):
        # the second case's input is fp32 (a residual stream) normalised into bf16
        low = torch.float32 if i == 1 else torch.bfloat16
        lo = [u.to(low).requires_grad_(True) for u in inputs]
        hi = [u.clone().requires_grad_(True) for u in inputs]
        a, r = op(*lo), op(*hi)
        a, r = (a if isinstance(a, tuple) else (a,)), (r if isinstance(r, tuple) else (r,))
        outs = [torch.randn(o.shape, generator=g, **D64) for o in r]
        for u, v in zip(a, r):
            assert u.dtype == out_dtype and 0 < rel(u, v) < 2e-2, i
        torch.autograd.backward(a, [o.to(u.dtype) for o, u in zip(outs, a)])
        torch.autograd.backward(r, outs)
        for u, v in zip(lo, hi):
            assert u.grad.dtype == low and 0 < rel(u.grad, v.grad) < 2e-2, i
