"""Vision tower: BEiT (as the original uses it) and plain ViT/DeiT, in one compact module.

Parameter names follow Hugging Face's ``BeitModel`` / ``ViTModel`` so that original Singularity
checkpoints and HF weight folders load by name. BEiT: pre-LN layers with layer-scale
(``lambda_1/2``), per-layer relative position bias, key without bias, mean pooling of the patch
tokens + pooler LayerNorm. ViT/DeiT: absolute position embeddings, final LayerNorm, [CLS] pooling.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .attention import AttentionLayer, merge_heads, split_heads


class DropPath(nn.Module):
    """Stochastic depth per sample (BEiT's ``drop_path_rate``); identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def relative_position_index(window: tuple) -> torch.Tensor:
    """BEiT's (L, L) index into the relative-position table, L = Wh*Ww + 1 ([CLS] first)."""
    wh, ww = window
    num_rel = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    index = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:] = num_rel - 3  # cls -> token
    index[0:, 0] = num_rel - 2  # token -> cls
    index[0, 0] = num_rel - 1   # cls -> cls
    return index


class RelativePositionBias(nn.Module):
    def __init__(self, window: tuple, num_heads: int):
        super().__init__()
        num_rel = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self):
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (H, L, L)


class SelfAttention(AttentionLayer):
    def __init__(self, cfg, beit: bool, window):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d, bias=not beit)  # BEiT's key has no bias
        self.value = nn.Linear(d, d)
        self.dropout_p = cfg.attention_probs_dropout_prob
        own_bias = beit and cfg.use_relative_position_bias and not cfg.use_shared_relative_position_bias
        self.relative_position_bias = RelativePositionBias(window, self.num_heads) if own_bias else None

    def forward(self, x, shared_bias=None):
        q, k, v = (split_heads(f(x), self.num_heads) for f in (self.query, self.key, self.value))
        bias = self.relative_position_bias() if self.relative_position_bias is not None else shared_bias
        if bias is not None:
            bias = bias.unsqueeze(0)
        out = self.attend(q, k, v, bias, self.dropout_p if self.training else 0.0)
        return merge_heads(out)


class Attention(nn.Module):
    def __init__(self, cfg, beit, window):
        super().__init__()
        self.attention = SelfAttention(cfg, beit, window)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, shared_bias=None):
        return self.dropout(self.output.dense(self.attention(x, shared_bias)))


class Layer(nn.Module):
    def __init__(self, cfg, beit, window, drop_path):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = Attention(cfg, beit, window)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, d)
        self.act = ACT2FN[cfg.hidden_act]
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.layernorm_before = nn.LayerNorm(d, eps=eps)
        self.layernorm_after = nn.LayerNorm(d, eps=eps)
        init = getattr(cfg, "layer_scale_init_value", 0.0) if beit else 0.0
        if init > 0:
            self.lambda_1 = nn.Parameter(init * torch.ones(d))
            self.lambda_2 = nn.Parameter(init * torch.ones(d))
        else:
            self.lambda_1 = self.lambda_2 = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x, shared_bias=None):
        h = self.attention(self.layernorm_before(x), shared_bias)
        if self.lambda_1 is not None:
            h = self.lambda_1 * h
        x = x + self.drop_path(h)
        h = self.dropout(self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x)))))
        if self.lambda_2 is not None:
            h = self.lambda_2 * h
        return x + self.drop_path(h)


class VisionTransformer(nn.Module):
    """``forward(pixels (N, C, H, W)) -> (tokens (N, 1+P, D), pooled (N, D))``.

    BEiT: tokens are the raw last layer (the model adds ``vision_layernorm``), pooled is
    LayerNorm(mean of patch tokens). ViT: tokens after the final LayerNorm, pooled = [CLS].
    """

    def __init__(self, cfg, kind: str = "beit"):
        super().__init__()
        if kind not in ("beit", "vit", "deit"):
            raise ValueError(f"unknown vit_type {kind!r}; expected one of beit, vit, deit")
        self.beit = kind == "beit"
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_shape = (cfg.image_size // p, cfg.image_size // p)
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = nn.Conv2d(cfg.num_channels, d, p, stride=p)
        num_patches = self.patch_shape[0] * self.patch_shape[1]
        use_abs = getattr(cfg, "use_absolute_position_embeddings", True) if self.beit else True
        self.embeddings.position_embeddings = (
            nn.Parameter(torch.zeros(1, num_patches + 1, d)) if use_abs else None)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = nn.Module()
        shared = self.beit and cfg.use_relative_position_bias and cfg.use_shared_relative_position_bias
        self.encoder.relative_position_bias = (
            RelativePositionBias(self.patch_shape, cfg.num_attention_heads) if shared else None)
        rate = getattr(cfg, "drop_path_rate", 0.0) if self.beit else 0.0
        rates = torch.linspace(0, rate, cfg.num_hidden_layers).tolist()
        self.encoder.layer = nn.ModuleList(
            Layer(cfg, self.beit, self.patch_shape, r) for r in rates)
        if self.beit:
            if not getattr(cfg, "use_mean_pooling", True):
                raise ValueError("BEiT vision tower needs use_mean_pooling=True (as the original uses it)")
            self.pooler = nn.Module()
            self.pooler.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
            self.layernorm = None
        else:
            self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixels):
        x = self.embeddings.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.embeddings.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.embeddings.position_embeddings is not None:
            x = x + self.embeddings.position_embeddings
        x = self.embed_dropout(x)
        shared = self.encoder.relative_position_bias
        shared_bias = shared() if shared is not None else None
        for layer in self.encoder.layer:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, shared_bias, use_reentrant=False)
            else:
                x = layer(x, shared_bias)
        if self.beit:  # the QA model removes the pooler (pooler = None): no pooled output
            return x, (self.pooler.layernorm(x[:, 1:].mean(1)) if self.pooler is not None else None)
        x = self.layernorm(x)
        return x, x[:, 0]
