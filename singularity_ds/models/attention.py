"""The one attention function every tower calls (self, cross and temporal attention).

Keeping a single entry point means a fused kernel (``kernels/``) can later be switched in at one
place. Masks are additive biases, as in the original BERT/BEiT code: a padding mask becomes
``(1 - mask) * -10000`` so the numbers match the original exactly.
"""
from typing import Optional

import torch
import torch.nn.functional as F

MASK_VALUE = -10000.0  # the original's extended-attention-mask constant


def padding_bias(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """(B, L) 1/0 key mask -> additive bias (B, 1, 1, L); ``None`` stays ``None``."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, H, Lq, d); k, v: (B, H, Lk, d); bias: additive, broadcastable to (B, H, Lq, Lk)
    (relative-position bias and/or padding bias). Returns (B, H, Lq, d).
    """
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
