"""Text tower: BERT whose layers ``[fusion_layer, N)`` add cross-attention to vision tokens.

Compact re-implementation of the original's vendored ``xbert`` (itself from ALBEF), keeping its
parameter names (``bert.encoder.layer.N.crossattention...``, ``cls.predictions...``) so original
checkpoints and Hugging Face BERT folders load by name. All layers are post-LN.

Modes are plain layer ranges: text = ``[0, fusion_layer)``, fusion = ``[fusion_layer, N)``,
multimodal = ``[0, N)``. The temporal encoder is a ``BertEncoder`` with no cross-attention.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .attention import AttentionLayer, merge_heads, padding_bias, split_heads


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.register_buffer("position_ids",
                             torch.arange(cfg.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids):
        pos = self.position_ids[:, : input_ids.shape[1]]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(pos)
             + self.token_type_embeddings.weight[0])  # token_type_ids are always 0
        return self.dropout(self.LayerNorm(x))


class BertAttention(AttentionLayer):
    """Self- or cross-attention + output projection, residual and LayerNorm (post-LN)."""

    def __init__(self, cfg, cross: bool = False):
        super().__init__()
        d = cfg.hidden_size
        kv_width = getattr(cfg, "encoder_width", d) if cross else d
        self.num_heads = cfg.num_attention_heads
        self.self = nn.Module()
        self.self.query = nn.Linear(d, d)
        self.self.key = nn.Linear(kv_width, d)
        self.self.value = nn.Linear(kv_width, d)
        self.output = nn.Module()
        self.output.dense = nn.Linear(d, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.attn_dropout = cfg.attention_probs_dropout_prob
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def project_kv(self, context):
        """Keys and values (B, H, Lk, d) of ``context``; cross-attention's depend on the video only."""
        return (split_heads(self.self.key(context), self.num_heads),
                split_heads(self.self.value(context), self.num_heads))

    def project_q(self, x):
        """Queries (B, H, L, d) of hidden states ``x``; cross-attention's depend on the text only."""
        return split_heads(self.self.query(x), self.num_heads)

    def forward(self, x, bias=None, context=None, kv=None, q=None, keep=None):
        """``q``: precomputed :meth:`project_q` of ``x``. ``keep``: compute only the first ``keep`` rows
        (queries, residual); all of ``x`` still gives the keys/values (a last layer read at [CLS] only)."""
        h = x if keep is None else x[:, :keep]
        q = self.project_q(h) if q is None else q
        k, v = kv if kv is not None else self.project_kv(x if context is None else context)
        if k.shape[0] != q.shape[0]:  # one cached video for a batch of texts: a stride-0 view, no copy
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        out = merge_heads(self.attend(q, k, v, bias, self.attn_dropout if self.training else 0.0))
        return self.output.LayerNorm(self.dropout(self.output.dense(out)) + h)


class BertLayer(nn.Module):
    def __init__(self, cfg, cross: bool):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.crossattention = BertAttention(cfg, cross=True) if cross else None
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.output.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACT2FN[cfg.hidden_act]
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, bias=None, context=None, context_bias=None, kv=None, keep=None):
        """``keep``: only the first ``keep`` rows come out (see :meth:`BertAttention.forward`)."""
        return self.after_self_attention(self.attention(x, bias, keep=keep), context, context_bias, kv)

    def after_self_attention(self, x, context=None, context_bias=None, kv=None, cross_q=None):
        """Cross-attention (if any) and the feed-forward block over self-attention output ``x``;
        ``cross_q``: the cross-attention queries of ``x``, if already projected."""
        if self.crossattention is not None:
            if context is None and kv is None:
                raise ValueError("a fusion layer needs vision tokens (encoder_hidden_states)")
            x = self.crossattention(x, context_bias, context, kv, q=cross_q)
        h = self.dropout(self.output.dense(self.act(self.intermediate.dense(x))))
        return self.output.LayerNorm(h + x)


class BertEncoder(nn.Module):
    """Layers ``i >= cfg.fusion_layer`` carry cross-attention (none when fusion_layer >= N)."""

    def __init__(self, cfg):
        super().__init__()
        fusion = getattr(cfg, "fusion_layer", cfg.num_hidden_layers)
        self.layer = nn.ModuleList(BertLayer(cfg, i >= fusion) for i in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, bias=None, context=None, context_bias=None, start=0, end=None, kv=None):
        """``kv``: precomputed cross-attention (keys, values), one pair per layer of ``[start, end)``."""
        for i, layer in enumerate(self.layer[start:end]):
            layer_kv = kv[i] if kv is not None else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, bias, context, context_bias, layer_kv, use_reentrant=False)
            else:
                x = layer(x, bias, context, context_bias, layer_kv)
        return x


class BertModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


class MLMHead(nn.Module):
    """``cls.predictions``: dense, act, LayerNorm, then the decoder TIED to the word embeddings."""

    def __init__(self, cfg):
        super().__init__()
        self.predictions = nn.Module()
        self.predictions.transform = nn.Module()
        self.predictions.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.predictions.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.predictions.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x, word_embeddings: torch.Tensor):
        t = self.predictions.transform
        x = t.LayerNorm(self.act(t.dense(x)))
        return F.linear(x, word_embeddings, self.predictions.bias)


class TextEncoder(nn.Module):
    """``bert`` (+ ``cls`` MLM head when pretraining), named like ``BertForMaskedLM``."""

    def __init__(self, cfg, mlm_head: bool):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = MLMHead(cfg) if mlm_head else None

    @property
    def fusion_layer(self) -> int:
        return self.config.fusion_layer

    def run(self, x, mask, start, end, context=None, context_mask=None, kv=None):
        """Layers ``[start, end)`` over hidden states ``x`` with 1/0 masks (None = attend to all)."""
        bias = padding_bias(mask, x.dtype)
        context_bias = padding_bias(context_mask, x.dtype) if context_mask is not None else None
        return self.bert.encoder(x, bias, context, context_bias, start, end, kv)

    def text(self, input_ids, mask):
        """mode='text': embeddings + text-only layers."""
        return self.run(self.bert.embeddings(input_ids), mask, 0, self.fusion_layer)

    def fusion(self, text_embeds, mask, image_embeds=None,
               image_mask: Optional[torch.Tensor] = None, kv=None):
        """mode='fusion': the cross-attention layers over text states from :meth:`text`; ``kv`` from
        :meth:`cross_kv` replaces ``image_embeds``."""
        return self.run(text_embeds, mask, self.fusion_layer, None, image_embeds, image_mask, kv)

    def cross_kv(self, image_embeds):
        """Each fusion layer's cross-attention keys/values of ``image_embeds``: computed once per
        video, reused for every text scored against it (evaluation)."""
        return [layer.crossattention.project_kv(image_embeds)
                for layer in self.bert.encoder.layer[self.fusion_layer:]]

    def fusion_text_state(self, text_embeds, mask):
        """The part of the first fusion layer that depends on the text alone: its self-attention output
        (B, L, D) and that output's cross-attention queries (B, H, L, d). Evaluation computes it once per
        text and reuses it for every candidate video (:meth:`fusion_cls`). With a single fusion layer
        only the [CLS] row is kept (L = 1): nothing else reaches the ITM head."""
        layers = self.bert.encoder.layer[self.fusion_layer:]
        first = layers[0]
        h = first.attention(text_embeds, padding_bias(mask, text_embeds.dtype),
                            keep=1 if len(layers) == 1 else None)
        return h, first.crossattention.project_q(h)

    def fusion_cls(self, h, q, mask, kv, kv_bias=None):
        """The fused [CLS] state (B, D) of row-aligned (text, video) pairs, from each pair's text state
        (:meth:`fusion_text_state`: ``h``, ``q``; text mask ``mask``) and its video's cross-attention
        keys/values (``kv``: one (k, v) per fusion layer, :meth:`cross_kv`; ``kv_bias``: their padding
        bias, when videos of different lengths are padded to one). Equal to ``fusion(...)[:, 0]``; the
        last layer computes its [CLS] row only (its other rows are never read)."""
        layers = self.bert.encoder.layer[self.fusion_layer:]
        x = layers[0].after_self_attention(h, None, kv_bias, kv[0], cross_q=q)
        bias = padding_bias(mask, x.dtype)
        for i in range(1, len(layers)):
            x = layers[i](x, bias, None, kv_bias, kv[i], keep=1 if i == len(layers) - 1 else None)
        return x[:, 0]

    def mlm_logits(self, hidden):
        return self.cls(hidden, self.bert.embeddings.word_embeddings.weight)
