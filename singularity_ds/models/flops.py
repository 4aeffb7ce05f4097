"""Analytic matmul FLOPs of one Singularity pretraining / retrieval step, per sample.

Counted: every matrix product (2 FLOPs per multiply-add), the way MFU is usually reported; layer norms,
softmax and activations are not. A transformer layer over n tokens of width d with FFN width f costs
``8 n d^2`` (Q, K, V, output projections) + ``4 n^2 d`` (scores and weighted sum) + ``4 n d f`` (FFN);
a cross-attention block with n_q queries over n_k keys of width d_k adds ``4 n_q d^2 + 4 n_k d_k d +
4 n_q n_k d``. One sample of the step:

- vision: T frames x (patch embedding + BEiT/ViT layers over 1 + (res/patch)^2 tokens); a timm tower's
  from the model timm builds (:func:`timm_frame`);
- temporal encoder (T > 1): at each token position, its layers over the T frames;
- text: the text-only layers once (ITC), the fusion layers 3x (ITM: the positive and two hard-negative
  pairs), then the MLM pass: text-only + fusion layers again on the masked ids, and the vocabulary head
  at the masked positions only (``mlm_prob`` of the tokens). The fusion layers' cross-attention
  keys/values of the video tokens are projected once per video and shared by all four passes;
- heads: ITC projections and the similarity row against the batch, the ITM head.

QA (:func:`qa_step_flops`): vision as above; the question through every text layer, the fusion ones
cross-attending to the video tokens; per answer, the decoder (causal self-attention + cross-attention to
the question states) and the vocabulary head at every answer position (the original's teacher forcing).

Training = 3x forward (backward costs two forwards). Unit-tested against PyTorch's FlopCounterMode and
a hand count.
"""
from .arch import bert_config, decoder_config, temporal_config, vision_config


def layer(n, d, f):
    return 8 * n * d * d + 4 * n * n * d + 4 * n * d * f


def cross(n_q, n_k, d, d_k):
    return 4 * n_q * d * d + 4 * n_k * d_k * d + 4 * n_q * n_k * d


def timm_frame(config):
    """(forward FLOPs of one frame, tokens per frame, width) of a timm tower, read off the model timm builds
    (on the meta device: no memory, no weights). Every ``nn.Linear`` of a block runs over all n tokens;
    each block's attention adds ``4 n^2 d`` (d = heads x head width); an attention-pool head (SigLIP's MAP)
    runs its query, output and MLP over its latent tokens, its keys/values over the n tokens, and
    ``4 latents n d`` of attention. Rotary embeddings (EVA-02), layer scale and norms are not matmuls."""
    from torch import nn

    from ..timm_hub import resolve
    from .timm_vit import create

    m = create(resolve(config), config.image_res, device="meta")
    grid = [int(g) for g in m.patch_embed.grid_size]
    patches = grid[0] * grid[1]
    n = patches + int(getattr(m, "num_prefix_tokens", 1))
    proj = m.patch_embed.proj
    flops = 2 * patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * proj.out_channels

    def linears(module, rows):
        return sum(2 * rows * lin.in_features * lin.out_features
                   for lin in module.modules() if isinstance(lin, nn.Linear))

    for block in m.blocks:
        flops += linears(block, n) + 4 * n * n * block.attn.num_heads * block.attn.head_dim
    pool = getattr(m, "attn_pool", None)
    if pool is not None:
        latents = pool.latent_len
        flops += (linears(pool, latents) - linears(pool.kv, latents) + linears(pool.kv, n)
                  + 4 * latents * n * pool.num_heads * pool.head_dim)
    return flops, n, int(m.num_features)


def _vision(config, t):
    """Forward FLOPs of the vision tower (+ temporal encoder) for one sample of t frames; tokens/frame and
    width."""
    txt = bert_config(config)
    if config.vit_type == "timm":
        frame, nv, dv = timm_frame(config)
    else:
        vis = vision_config(config)
        dv, fv, nv = vis.hidden_size, vis.intermediate_size, 1 + (vis.image_size // vis.patch_size) ** 2
        frame = 2 * (nv - 1) * 3 * vis.patch_size ** 2 * dv + vis.num_hidden_layers * layer(nv, dv, fv)
    vision = t * frame
    temporal_encoder, temporal = config.temporal_vision_encoder, 0
    if t > 1 and temporal_encoder.enable:
        tcfg = temporal_config(txt, dv, temporal_encoder.num_layers)
        temporal = nv * tcfg.num_hidden_layers * layer(t, dv, tcfg.intermediate_size)
    return vision, temporal, nv, dv


def qa_step_flops(config, num_frames: int = None, q_len: int = None,
                  a_len: int = None, answers: int = 1) -> dict:
    """Forward FLOPs per question (``answers`` answers each) by part, plus ``forward`` and ``train``."""
    txt = bert_config(config)
    dec = decoder_config(txt, config)
    t = num_frames or config.video_input.num_frames
    lq, la = q_len or config.max_q_len, a_len or config.max_a_len
    vision, temporal, nv, dv = _vision(config, t)
    dt, ft = txt.hidden_size, txt.intermediate_size
    fusion = txt.num_hidden_layers - txt.fusion_layer
    question = txt.num_hidden_layers * layer(lq, dt, ft) + fusion * cross(lq, t * nv, dt, dv)
    decoder = dec.num_hidden_layers * (layer(la, dt, dec.intermediate_size) + cross(la, lq, dt, dt))
    head = la * (2 * dt * dt + 2 * dt * dec.vocab_size)
    out = dict(vision=vision, temporal=temporal, question=question, answer=answers * (decoder + head))
    out["forward"] = sum(out.values())
    out["train"] = 3 * out["forward"]
    return out


def step_flops(config, batch_size: int, num_frames: int = None, text_len: int = None, media="video") -> dict:
    """Forward FLOPs per sample by part, plus ``forward`` and ``train`` (3x) totals."""
    txt = bert_config(config)
    t = num_frames or (config.video_input.num_frames if media == "video" else 1)
    max_len = config.max_txt_l
    length = text_len or (max_len[media] if hasattr(max_len, "keys") else max_len)
    vision, temporal, nv, dv = _vision(config, t)
    dt, ft, vocab = txt.hidden_size, txt.intermediate_size, txt.vocab_size
    fusion_at, layers = txt.fusion_layer, txt.num_hidden_layers
    out = dict(vision=vision, temporal=temporal)
    text_only = fusion_at * layer(length, dt, ft)
    kv = (layers - fusion_at) * 4 * t * nv * dv * dt  # cross-attention keys/values: once per video
    fusion = (layers - fusion_at) * (layer(length, dt, ft) + cross(length, t * nv, dt, dv)) - kv
    embed = config.embed_dim
    out["itc"] = text_only + 2 * t * dv * embed + 2 * dt * embed + 2 * t * embed * batch_size
    out["itm"] = kv + 3 * (fusion + 2 * dt * 2)
    out["mlm"] = 0
    if config.loss_weight.mlm > 0:
        masked = config.mlm_prob * length
        out["mlm"] = text_only + fusion + masked * (2 * dt * dt + 2 * dt * vocab)
    out["forward"] = sum(out.values())
    out["train"] = 3 * out["forward"]
    return out
