"""Flash attention in Triton, forward and backward, with an additive bias of any broadcast shape.

One kernel family covers every attention the model runs: BEiT self-attention with its relative
position bias ``(1, H, L, L)`` (its gradient flows back to the bias table), BERT self-attention with a
key-padding bias ``(B, 1, 1, L)``, the decoder's causal bias ``(N, 1, L, L)``, the fusion
cross-attention (32 text queries over up to T*197 frame tokens) and the temporal attention (huge batch,
T <= 32 keys). The bias is read through its strides, so a broadcast dimension costs nothing.

Forward keeps the running max / sum per query row (online softmax) and stores the log-sum-exp;
backward recomputes the probabilities block by block (FlashAttention-2): one kernel per key block
accumulates dK, dV (and writes dS when the bias needs a gradient, reduced to the bias's shape in
PyTorch), one kernel per query block accumulates dQ -- no atomics, deterministic.

No dropout: the model's attention function uses SDPA when attention dropout is active (BERT in
training); BEiT and every evaluation run here. Head dims 16/32/64/128. fp32 inputs use IEEE fp32 dot
products (no TF32) so that fp32 results match the reference to 1e-4; bf16/fp16 accumulate in fp32.
Runs on CPU tensors under ``TRITON_INTERPRET=1`` (slow; for the correctness tests).
"""
import math

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)


def _blocks(q):
    if not q.is_cuda:  # the interpreter: small tiles are much faster
        return 16, 16
    return (64, 64) if q.shape[-1] <= 64 else (64, 32)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. IEEE: fp32 inputs without TF32. UPCAST: bf16 operands widened
    to fp32 first (exact: bf16 products are exact in fp32) -- the CPU interpreter cannot multiply
    bf16 matrices (Triton 3.8), the GPU never needs it."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile(ptr, b, h, sb, sh, sl, offs, ok, offs_d):
    """Rows ``offs`` of one (batch, head) of a (B, H, L, D) tensor (unit stride on D), 0 outside ``ok``."""
    return tl.load(ptr + b * sb + h * sh + offs[:, None] * sl + offs_d[None, :], mask=ok[:, None], other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, Bias, Out, Lse,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sob, soh, som,
                H, Lq, Lk, scale,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)  # batch*heads on axis 0: no 65,535 limit
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    q = _tile(Q, b, h, sqb, sqh, sqm, offs_m, row_ok, offs_d)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        k = _tile(K, b, h, skb, skh, skn, offs_n, col_ok, offs_d)
        v = _tile(V, b, h, svb, svh, svn, offs_n, col_ok, offs_d)
        s = _dot(q, tl.trans(k), IEEE, UPCAST) * scale
        if HAS_BIAS:
            s += tl.load(Bias + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + pid_bh * Lq + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _probs(q, k, Bias, b, h, offs_m, offs_n, row_ok, col_ok, lse, sbb, sbh, sbm, sbn, scale,
           HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    s = _dot(q, tl.trans(k), IEEE, UPCAST) * scale
    if HAS_BIAS:
        s += tl.load(Bias + b * sbb + h * sbh + offs_m[:, None] * sbm + offs_n[None, :] * sbn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    p = tl.exp(s - lse[:, None])
    return tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)


@triton.jit
def _bwd_kv_kernel(Q, K, V, Bias, DO, Lse, Delta, DK, DV, DS,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sdb, sdh, sdm,
                   H, Lq, Lk, scale,
                   HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    col_ok = offs_n < Lk
    k = _tile(K, b, h, skb, skh, skn, offs_n, col_ok, offs_d)
    v = _tile(V, b, h, svb, svh, svn, offs_n, col_ok, offs_d)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    for start in range(0, Lq, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q = _tile(Q, b, h, sqb, sqh, sqm, offs_m, row_ok, offs_d)
        do = _tile(DO, b, h, sdb, sdh, sdm, offs_m, row_ok, offs_d)
        lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=row_ok, other=0.0)
        p = _probs(q, k, Bias, b, h, offs_m, offs_n, row_ok, col_ok, lse, sbb, sbh, sbm, sbn, scale, HAS_BIAS,
                   IEEE, UPCAST)
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
        dp = _dot(do, tl.trans(v), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(DS + pid_bh * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :], ds,
                     mask=row_ok[:, None] & col_ok[None, :])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE, UPCAST) * scale
    tl.store(DK + pid_bh * Lk * D + offs_n[:, None] * D + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + pid_bh * Lk * D + offs_n[:, None] * D + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_q_kernel(Q, K, V, Bias, DO, Lse, Delta, DQ,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, sdb, sdh, sdm,
                  H, Lq, Lk, scale,
                  HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)  # batch*heads on axis 0: no 65,535 limit
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < Lq
    q = _tile(Q, b, h, sqb, sqh, sqm, offs_m, row_ok, offs_d)
    do = _tile(DO, b, h, sdb, sdh, sdm, offs_m, row_ok, offs_d)
    lse = tl.load(Lse + pid_bh * Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + pid_bh * Lq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, Lk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Lk
        k = _tile(K, b, h, skb, skh, skn, offs_n, col_ok, offs_d)
        v = _tile(V, b, h, svb, svh, svn, offs_n, col_ok, offs_d)
        p = _probs(q, k, Bias, b, h, offs_m, offs_n, row_ok, col_ok, lse, sbb, sbh, sbm, sbn, scale, HAS_BIAS,
                   IEEE, UPCAST)
        dp = _dot(do, tl.trans(v), IEEE, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE, UPCAST) * scale
    tl.store(DQ + pid_bh * Lq * D + offs_m[:, None] * D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _bias_args(bias, shape):
    if bias is None:
        return None, (0, 0, 0, 0)
    full = bias.expand(shape)  # broadcast dims get stride 0: read in place, never materialised
    return full, tuple(full.stride())


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        b, h, lq, d = q.shape
        lk = k.shape[2]
        ctx.kv_shapes = k.shape, v.shape  # a cached video's K/V may come with batch 1 (a stride-0 expand)
        k, v = k.expand(b, h, lk, d), v.expand(b, h, lk, d)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        bias_full, bs = _bias_args(bias, (b, h, lq, lk))
        out = torch.empty(b, h, lq, d, device=q.device, dtype=q.dtype)
        lse = torch.empty(b * h, lq, device=q.device, dtype=torch.float32)
        bm, bn = _blocks(q)
        ieee, upcast = q.dtype == torch.float32, q.dtype == torch.bfloat16 and not q.is_cuda
        _fwd_kernel[(b * h, triton.cdiv(lq, bm))](
            q, k, v, bias_full if bias_full is not None else q, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *bs, out.stride(0), out.stride(1), out.stride(2),
            h, lq, lk, scale, HAS_BIAS=bias is not None, IEEE=ieee, UPCAST=upcast, D=d, BLOCK_M=bm,
            BLOCK_N=bn)
        ctx.save_for_backward(q, k, v, bias_full if bias_full is not None else torch.empty(0), out, lse)
        ctx.scale, ctx.has_bias = scale, bias is not None
        ctx.bias_shape = bias.shape if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias_full, out, lse = ctx.saved_tensors
        b, h, lq, d = q.shape
        lk = k.shape[2]
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1).reshape(b * h, lq)
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        bs = tuple(bias_full.stride()) if ctx.has_bias else (0, 0, 0, 0)
        bias_arg = bias_full if ctx.has_bias else q
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty(b, h, lk, d, device=q.device, dtype=q.dtype)
        dv = torch.empty_like(dk)
        ds = torch.zeros(b, h, lq, lk, device=q.device, dtype=torch.float32) if bias_grad else q
        bm, bn = _blocks(q)
        ieee, upcast = q.dtype == torch.float32, q.dtype == torch.bfloat16 and not q.is_cuda
        common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), *bs, dout.stride(0), dout.stride(1), dout.stride(2),
                  h, lq, lk, ctx.scale)
        _bwd_kv_kernel[(b * h, triton.cdiv(lk, bn))](
            q, k, v, bias_arg, dout, lse, delta, dk, dv, ds, *common,
            HAS_BIAS=ctx.has_bias, BIAS_GRAD=bias_grad, IEEE=ieee, UPCAST=upcast, D=d, BLOCK_M=bm, BLOCK_N=bn)
        _bwd_q_kernel[(b * h, triton.cdiv(lq, bm))](
            q, k, v, bias_arg, dout, lse, delta, dq, *common,
            HAS_BIAS=ctx.has_bias, IEEE=ieee, UPCAST=upcast, D=d, BLOCK_M=bm, BLOCK_N=bn)
        dbias = ds.sum_to_size(ctx.bias_shape).to(bias_full.dtype) if bias_grad else None
        return dq, dk.sum_to_size(ctx.kv_shapes[0]), dv.sum_to_size(ctx.kv_shapes[1]), dbias, None


def supported(q, k, v, bias=None, dropout_p: float = 0.0) -> str:
    """'' when the kernel handles these inputs, else the reason it does not."""
    if dropout_p > 0:
        return "attention dropout is on"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (supported: {HEAD_DIMS})"
    if q.dtype not in (torch.float32,
                       torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}"
    if q.dim() != 4:
        return f"{q.dim()}-d inputs"
    return ""


def flash_attention(q, k, v, bias=None, scale=None):
    """softmax(q k^T * scale + bias) v for q (B, H, Lq, d), k/v (B|1, H, Lk, d), bias broadcastable to
    (B, H, Lq, Lk); differentiable in q, k, v and bias."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if bias is not None:
        bias = bias.to(q.dtype) if not bias.requires_grad else bias
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
    return _FlashAttention.apply(q, k, v, bias, scale)
