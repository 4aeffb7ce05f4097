"""The one attention function every tower calls (self, cross and temporal attention).

Keeping a single entry point means the fused kernel (``kernels/attention.py``) is switched in at one
place. Which implementation runs is a setting of each model (its config's ``attention_impl``), held by
its :class:`AttentionLayer` modules, not of the process: two models in one process (a training model
and a reference, a benchmark's variants) each keep their own. Masks are additive biases, as in the
original BERT/BEiT code: a padding mask becomes ``(1 - mask) * -10000`` so the numbers match the
original exactly.
"""
import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.schema import ATTENTION_IMPLS

logger = logging.getLogger(__name__)

MASK_VALUE = -10000.0  # the original's extended-attention-mask constant


def padding_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, L) 1/0 key mask -> additive bias (B, 1, 1, L); ``None`` stays ``None``."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def pad_to_longest(seqs, dtype: torch.dtype):
    """Sequences (L_i, D) of different lengths -> zero-padded (n, L_max, D) and the additive key bias
    (n, 1, 1, L_max) that masks the padding (``None`` when all lengths are equal: nothing to mask). Lets
    keys/values of several videos with different token counts go through one batched attention call."""
    lengths = [s.shape[0] for s in seqs]
    if len(set(lengths)) == 1:
        return torch.stack(list(seqs)), None
    padded = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)
    lengths = torch.tensor(lengths, device=padded.device)
    mask = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
    return padded, padding_bias(mask, dtype)


_logged = set()  # fallback reasons already logged (logging once per process is enough)


def check_attention_impl(impl: str) -> str:
    """``auto``: the Triton kernel for forward-only attention on CUDA where it supports the inputs, SDPA
    otherwise (training, and always on CPU);
    ``triton``: the kernel wherever it can run (CPU only under ``TRITON_INTERPRET=1``); ``sdpa``;
    ``math`` (explicit softmax in fp32, the reference). On CPU, attention SDPA cannot fuse (dropout, a
    bias that needs its gradient) runs :func:`_explicit` under ``auto`` and ``sdpa``."""
    if impl not in ATTENTION_IMPLS:  # the schema checks configs; this, direct callers
        from ..errors import ConfigError
        raise ConfigError(f"attention_impl={impl!r}; expected one of {', '.join(ATTENTION_IMPLS)}")
    return impl


class AttentionLayer(nn.Module):
    """A module that calls :func:`attention`; ``attention_impl`` is set by its model
    (``Singularity.set_attention_impl``)."""

    attention_impl = "auto"

    def attend(self, q, k, v, bias=None, dropout_p: float = 0.0) -> torch.Tensor:
        return attention(q, k, v, bias, dropout_p, self.attention_impl)


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("attention: SDPA instead of the Triton kernel (%s)", reason)


def _triton_reason(q, k, v, bias, dropout_p) -> str:
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device; TRITON_INTERPRET=1 runs the kernel on CPU, slowly"
    try:
        from ..kernels.attention import supported
    except ImportError as e:  # no triton installed
        return f"triton unavailable: {e}"
    return supported(q, k, v, bias, dropout_p)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, impl: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention with implementation ``impl`` (see :func:`check_attention_impl`).

    q: (B, H, Lq, d); k, v: (B, H, Lk, d); bias: additive, broadcastable to (B, H, Lq, Lk)
    (relative-position bias and/or padding bias). Returns (B, H, Lq, d).
    """
    # auto: the kernel for forward-only attention (evaluation, extraction), where it beat SDPA on H200;
    # training keeps SDPA, whose backward measured faster (docs/benchmarks.md)
    if impl == "triton" or (impl == "auto" and q.is_cuda and not _needs_grad(q, k, v, bias)):
        reason = _triton_reason(q, k, v, bias, dropout_p)
        if not reason:
            from ..kernels.attention import flash_attention
            return flash_attention(q, k, v, bias)
        _log_once(reason)
    if impl == "math":
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if bias is not None:
            scores = scores + bias.float()
        probs = F.dropout(scores.softmax(-1), dropout_p)
        return (probs @ v.float()).to(q.dtype)
    if bias is not None:
        bias = bias.to(q.dtype)
    if not q.is_cuda and (dropout_p > 0 or _needs_grad(bias)):
        return _explicit(q, k, v, bias, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def _explicit(q, k, v, bias, dropout_p: float) -> torch.Tensor:
    """Training attention on CPU where SDPA has no fused kernel (dropout, or a bias that needs its
    gradient: BEiT's relative-position table). SDPA's math fallback there scales q and k separately and
    runs a "safe" softmax (isneginf + all + where: three more passes over the (Lq, Lk) scores, forward
    and backward); this is the original's computation, in its dtype: one scaling of q (the same bits
    as scaling the scores when 1/sqrt(d) is a power of two, d = 64), bias, softmax, dropout."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(-1)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
