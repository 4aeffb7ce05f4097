"""Analytic matmul FLOPs of one Singularity pretraining / retrieval step, per sample.

Counted: every matrix product (2 FLOPs per multiply-add), the way MFU is usually reported; layer norms,
softmax and activations are not. A transformer layer over n tokens of width d with FFN width f costs
``8 n d^2`` (Q, K, V, output projections) + ``4 n^2 d`` (scores and weighted sum) + ``4 n d f`` (FFN);
a cross-attention block with n_q queries over n_k keys of width d_k adds ``4 n_q d^2 + 4 n_k d_k d +
4 n_q n_k d``. One sample of the step:

- vision: T frames x (patch embedding + BEiT/ViT layers over 1 + (res/patch)^2 tokens);
- temporal encoder (T > 1): at each token position, its layers over the T frames;
- text: the text-only layers once (ITC), the fusion layers 3x (ITM: the positive and two hard-negative
  pairs), then the MLM pass: text-only + fusion layers again on the masked ids, and the vocabulary head
  at the masked positions only (``mlm_prob`` of the tokens);
- heads: ITC projections and the similarity row against the batch, the ITM head.

Training = 3x forward (backward costs two forwards). Unit-tested against PyTorch's FlopCounterMode.
"""
from ..models.arch import bert_config, temporal_config, vision_config


def layer(n, d, f):
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * f


def cross(n_q, n_k, d, d_k):
    return 4 * n_q * d * d + 4 * n_k * d_k * d + 4 * n_q * n_k * d


def step_flops(config, batch_size: int, num_frames: int = None, text_len: int = None, media="video") -> dict:
    """Forward FLOPs per sample by part, plus ``forward`` and ``train`` (3x) totals."""
    vis, txt = vision_config(config), bert_config(config)
    t = num_frames or (config.video_input.num_frames if media == "video" else 1)
    max_len = config.max_txt_l
    length = text_len or (max_len[media] if hasattr(max_len, "keys") else max_len)
    dv, fv, nv = vis.hidden_size, vis.intermediate_size, 1 + (vis.image_size // vis.patch_size) ** 2
    dt, ft, vocab = txt.hidden_size, txt.intermediate_size, txt.vocab_size
    fusion_at, layers = txt.fusion_layer, txt.num_hidden_layers
    patch = 2 * (nv - 1) * 3 * vis.patch_size ** 2 * dv
    out = dict(vision=t * (patch + vis.num_hidden_layers * layer(nv, dv, fv)))
    tve = config.get("temporal_vision_encoder", {})
    out["temporal"] = 0
    if t > 1 and tve.get("enable", False):
        tcfg = temporal_config(txt, dv, tve.get("num_layers", 2))
        out["temporal"] = nv * tcfg.num_hidden_layers * layer(t, dv, tcfg.intermediate_size)
    text_only = fusion_at * layer(length, dt, ft)
    fusion = (layers - fusion_at) * (layer(length, dt, ft) + cross(length, t * nv, dt, dv))
    embed = config.get("embed_dim", 256)
    out["itc"] = text_only + 2 * t * dv * embed + 2 * dt * embed + 2 * t * embed * batch_size
    out["itm"] = 3 * (fusion + 2 * dt * 2)
    weights = config.get("loss_weight", {})
    out["mlm"] = 0
    if float(weights.get("mlm", 0) or 0) > 0:
        masked = config.get("mlm_prob", 0.15) * length
        out["mlm"] = text_only + fusion + masked * (2 * dt * dt + 2 * dt * vocab)
    out["forward"] = sum(out.values())
    out["train"] = 3 * out["forward"]
    return out
