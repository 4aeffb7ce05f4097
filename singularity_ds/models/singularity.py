"""The Singularity model: vision tower + BERT with fusion layers + optional temporal modelling.

Method names follow the original (``encode_image``, ``encode_text``, ``get_sim``, ...) so that code
ported from it reads the same; parameter names follow its checkpoints (pretraining layout, i.e.
``text_encoder.bert.*``; the loader maps the fine-tuned layout onto it).

Shapes: video (B, T, C, H, W); Li tokens per frame ([CLS] + patches); D vision width.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .. import timm_hub
from ..config import complete_config
from . import losses
from .arch import bert_config, temporal_config, vision_config
from .attention import AttentionLayer, check_attention_impl
from .bert import BertEncoder, TextEncoder
from .timm_vit import TimmVisionTower
from .vit import VisionTransformer


def init_weights(module: nn.Module, std: float = 0.02):
    """BERT/ViT-style init for randomly initialised towers (the original's ``_init_transformer_weights``)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.data.normal_(0.0, std)
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.data.normal_(0.0, std)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.data.fill_(1.0)
            m.bias.data.zero_()


def interpolate_temporal_embed(temp_embed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(1, T_old, 1, D) -> (1, num_frames, 1, D), linear interpolation (the original's)."""
    x = temp_embed.squeeze(2).permute(0, 2, 1)
    x = F.interpolate(x, num_frames, mode="linear")
    return x.permute(0, 2, 1).unsqueeze(2)


class Singularity(nn.Module):
    def __init__(self, config, mlm_head: bool = None, retrieval_heads: bool = True):
        super().__init__()
        config = complete_config(config)  # keys the given config lacks take the schema's defaults
        self.config = config
        self.vit_type = config.vit_type
        vis_cfg = None
        if self.vit_type == "timm":  # built and initialised by timm (its own init scheme)
            self.vision_encoder = TimmVisionTower(timm_hub.resolve(config), config.image_res)
            self.vision_width = self.vision_encoder.width
        else:
            vis_cfg = vision_config(config)
            self.vision_encoder = VisionTransformer(vis_cfg, self.vit_type)
            self.vision_width = vis_cfg.hidden_size
        txt_cfg = bert_config(config)
        txt_cfg.encoder_width = self.vision_width  # the fusion layers' cross-attention reads vision tokens
        self.text_width = txt_cfg.hidden_size
        if mlm_head is None:
            mlm_head = config.loss_weight.mlm > 0
        self.text_encoder = TextEncoder(txt_cfg, mlm_head)
        if vis_cfg is not None:  # (this order of random draws is the one the reference fixtures hold)
            init_weights(self.vision_encoder, vis_cfg.initializer_range)
        init_weights(self.text_encoder, txt_cfg.initializer_range)
        for layer in getattr(getattr(self.vision_encoder, "encoder", None), "layer", ()):
            if layer.lambda_1 is not None:  # BEiT's layer-scale starts at its init value
                layer.lambda_1.data.fill_(vis_cfg.layer_scale_init_value)
                layer.lambda_2.data.fill_(vis_cfg.layer_scale_init_value)
        # BEiT-only extra LayerNorm on the token states (not the pooled vector), eps 1e-12 as the original
        self.vision_layernorm = (nn.LayerNorm(self.vision_width, eps=1e-12) if self.vit_type == "beit"
                                 else None)

        if retrieval_heads:  # the QA model has none of these (nor the BEiT pooler)
            embed_dim = config.embed_dim
            self.vision_proj = nn.Linear(self.vision_width, embed_dim)
            self.text_proj = nn.Linear(self.text_width, embed_dim)
            # shape (1,), not the original's (): DeepSpeed cannot broadcast 0-dim parameters (the loader
            # converts the original's scalar); it broadcasts exactly like the scalar in every use
            self.temp = nn.Parameter(torch.ones(1) * config.temp)
            self.itm_head = nn.Linear(self.text_width, 2)
        elif self.vit_type == "timm":
            self.vision_encoder.pooled_output = False
        else:
            self.vision_encoder.pooler = None

        num_frames = config.video_input.num_frames
        self.temporal_embeddings = nn.Parameter(torch.zeros(1, num_frames, 1, self.vision_width))
        temporal_cfg = config.temporal_vision_encoder
        self.temporal_vision_encoder = None
        if temporal_cfg.enable:
            self.temporal_vision_encoder = BertEncoder(
                temporal_config(txt_cfg, self.vision_width, temporal_cfg.num_layers))
            init_weights(self.temporal_vision_encoder, txt_cfg.initializer_range)
        self.set_gradient_checkpointing(config.gradient_checkpointing)
        self.set_attention_impl(config.attention_impl)

    # ------------------------------------------------------------------ set-up
    def set_gradient_checkpointing(self, enable: bool):
        """Recompute each transformer layer's activations in backward (both towers + temporal)."""
        self.vision_encoder.gradient_checkpointing = enable
        self.text_encoder.bert.encoder.gradient_checkpointing = enable
        if self.temporal_vision_encoder is not None:
            self.temporal_vision_encoder.gradient_checkpointing = enable

    def set_attention_impl(self, impl: str):
        """The attention implementation of every attention module of this model (and of no other); a timm
        tower keeps timm's attention (SDPA, or its matmuls for ``math``)."""
        check_attention_impl(impl)
        for module in self.modules():
            if isinstance(module, AttentionLayer):
                module.attention_impl = impl
        if isinstance(self.vision_encoder, TimmVisionTower):
            self.vision_encoder.set_attention_impl(impl)

    @property
    def has_mlm_head(self) -> bool:
        return self.text_encoder.cls is not None

    def get_text_encoder(self) -> TextEncoder:
        return self.text_encoder

    @torch.no_grad()
    def clip_contrastive_temperature(self, min_val=0.001, max_val=0.5):
        self.temp.clamp_(min_val, max_val)

    # ------------------------------------------------------------------ vision
    def encode_frames(self, image):
        """Every frame through the vision tower independently (the original's ``_encode_image``).

        Returns frame tokens (B, T, Li, D) (BEiT: after ``vision_layernorm``) and pooled (B, T, D).
        """
        b, t = image.shape[:2]
        tokens, pooled = self.vision_encoder(image.flatten(0, 1))
        if self.vision_layernorm is not None:
            tokens = self.vision_layernorm(tokens)
        pooled = pooled.view(b, t, self.vision_width) if pooled is not None else None
        return tokens.view(b, t, -1, self.vision_width), pooled

    _encode_image = encode_frames  # the original's name

    def temporal_embedding(self, num_frames: int):
        if not self.config.add_temporal_embed:
            return 0.0
        if self.temporal_embeddings.shape[1] >= num_frames:
            return self.temporal_embeddings[:, :num_frames]
        return interpolate_temporal_embed(self.temporal_embeddings, num_frames)

    def temporal_encode(self, frame_embeds):
        """Self-attention across frames at each token position: (B, T, Li, D) -> same shape."""
        b, t, n, d = frame_embeds.shape
        x = frame_embeds.transpose(1, 2).reshape(b * n, t, d)
        x = self.temporal_vision_encoder(x)  # no mask: every frame is real
        return x.reshape(b, n, t, d).transpose(1, 2).contiguous()

    def encode_image(self, image):
        """Returns (image_embeds (B, T*Li, D), frame-major; pooled_image_embeds (B, T, D))."""
        b, t = image.shape[:2]
        frame_embeds, pooled = self.encode_frames(image)
        x = frame_embeds + self.temporal_embedding(t)
        if t > 1 and self.temporal_vision_encoder is not None:
            x = self.temporal_encode(x)
            if self.config.temporal_vision_encoder.update_pooler_embed:
                pooled = x[:, :, 0]
        return x.reshape(b, -1, self.vision_width), pooled

    # ------------------------------------------------------------------ text
    def encode_text(self, input_ids, attention_mask):
        """Text-only layers. Returns (text_embeds (B, L, D), pooled_text_embeds = [CLS] (B, D))."""
        text_embeds = self.text_encoder.text(input_ids, attention_mask)
        return text_embeds, text_embeds[:, 0]

    # ------------------------------------------------------------------ similarity / ITC
    def project(self, pooled_image_embeds, pooled_text_embeds):
        """Normalised projections: image (B, T, embed_dim), text (B, embed_dim)."""
        return self.project_image(pooled_image_embeds), self.project_text(pooled_text_embeds)

    def project_image(self, pooled_image_embeds):
        return F.normalize(self.vision_proj(pooled_image_embeds), dim=-1)

    def project_text(self, pooled_text_embeds):
        return F.normalize(self.text_proj(pooled_text_embeds), dim=-1)

    def get_sim(self, pooled_image_embeds, pooled_text_embeds, t=1):
        """(sim_i2t (B_video, B_text), sim_t2i): mean over frames of per-frame cosine, / t."""
        image_feat, text_feat = self.project(pooled_image_embeds, pooled_text_embeds)
        sim_i2t = losses.similarity(image_feat, text_feat, t)
        return sim_i2t, sim_i2t.T

    def get_contrastive_loss(self, pooled_image_embeds, pooled_text_embeds, idx):
        """ITC on the local batch (the original), or against the all-gathered global batch when
        ``itc_gather=True``. Returns (loss, local sim_i2t, local sim_t2i)."""
        image_feat, text_feat = self.project(pooled_image_embeds, pooled_text_embeds)
        sim_i2t = losses.similarity(image_feat, text_feat, self.temp)
        if not self.config.itc_gather:
            return losses.itc_loss(sim_i2t, sim_i2t.T, idx), sim_i2t, sim_i2t.T
        image_all, text_all = losses.gather_features(image_feat, text_feat)
        idx_all = losses.gather_no_grad(idx)
        g_i2t = losses.similarity(image_feat, text_all, self.temp)
        g_t2i = losses.similarity(image_all, text_feat, self.temp).T
        return losses.itc_loss(g_i2t, g_t2i, idx, idx_all), sim_i2t, sim_i2t.T

    # ------------------------------------------------------------------ fusion / ITM
    def fusion(self, text_embeds, text_mask, image_embeds, image_mask=None):
        """Fusion layers (mode='fusion'): text states attend to vision tokens. (N, L, D)."""
        return self.text_encoder.fusion(text_embeds, text_mask, image_embeds, image_mask)

    def itm_logits(self, text_embeds, text_mask, image_embeds, ensemble: str = "concat"):
        """ITM logits (N, 2) for row-aligned (text, video) pairs; class 1 = match.

        concat: ``image_embeds`` (N, T*Li, D) from :meth:`encode_image`, one fusion pass over the
        concatenated frames (early fusion). mean / max / lse: ``image_embeds`` (N, T, Li, D) from
        :meth:`encode_frames`; each frame is fused separately and the per-frame logits are pooled
        over frames (late fusion, as the original's evaluation).
        """
        if ensemble == "concat":
            return self.itm_head(self.fusion(text_embeds, text_mask, image_embeds)[:, 0])
        if image_embeds.dim() != 4:
            raise ValueError(f"late frame ensemble {ensemble!r} needs per-frame tokens (N, T, Li, D) "
                             f"from encode_frames(), got shape {tuple(image_embeds.shape)}")
        n, t = image_embeds.shape[:2]
        cls = self.fusion(text_embeds.repeat_interleave(t, 0), text_mask.repeat_interleave(t, 0),
                          image_embeds.flatten(0, 1))[:, 0]
        return losses.ensemble_frames(self.itm_head(cls).view(n, t, 2), ensemble)

    def get_itm_loss(self, sim_i2t, sim_t2i, text_embeds, text_mask, image_embeds, idx,
                     img_neg=None, txt_neg=None, kv=None):
        """ITM over the 3N batch [pos; (text, hard-neg video); (hard-neg text, video)].

        ``kv``: :meth:`TextEncoder.cross_kv` of ``image_embeds``. The original projects each video's
        tokens to keys/values once per pairing; they depend on the video only, so they are projected
        once and gathered for the three pairings (the same logits, a quarter of that cost)."""
        if img_neg is None:
            img_neg, txt_neg = losses.sample_negatives(
                sim_i2t, sim_t2i, idx, hard=self.config.itm_hard_neg)
        text_all = torch.cat([text_embeds, text_embeds, text_embeds[txt_neg]])
        mask_all = torch.cat([text_mask, text_mask, text_mask[txt_neg]])
        kv = kv if kv is not None else self.text_encoder.cross_kv(image_embeds)
        rows = torch.arange(len(text_embeds), device=text_embeds.device)
        rows = torch.cat([rows, torch.as_tensor(img_neg, device=rows.device), rows])
        # index_select: its backward (index_add) sums in a fixed order; k[rows]'s does not on CPU
        kv_all = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv]
        return losses.itm_loss(self.itm_head(self.text_encoder.fusion(text_all, mask_all, kv=kv_all)[:, 0]))

    # ------------------------------------------------------------------ MLM
    def mlm_logits(self, input_ids, attention_mask, image_embeds):
        """Masked ids -> text layers -> fusion layers with the video -> vocabulary logits."""
        text = self.text_encoder.text(input_ids, attention_mask)
        return self.text_encoder.mlm_logits(self.fusion(text, attention_mask, image_embeds))

    def get_mlm_loss(self, input_ids, attention_mask, image_embeds, mlm_inputs=None, kv=None):
        if mlm_inputs is None:
            cfg = self.text_encoder.config
            mlm_inputs = losses.mask_tokens(input_ids, cfg.vocab_size, self.config.mlm_prob,
                                            pad_id=cfg.pad_token_id)
        ids, labels = mlm_inputs
        # The vocabulary projection runs only where a token is masked: the original projects every
        # position and ignores the rest (label -100), the same loss at ~1/7 of the head's cost.
        hidden = self.text_encoder.fusion(self.text_encoder.text(ids, attention_mask), attention_mask,
                                          None if kv is not None else image_embeds, kv=kv)
        keep = labels != -100
        return losses.mlm_loss(self.text_encoder.mlm_logits(hidden[keep]), labels[keep])

    # ------------------------------------------------------------------ training step
    def forward(self, image, input_ids, attention_mask, idx, img_neg=None, txt_neg=None, mlm_inputs=None):
        """Weighted losses {loss_ita, loss_itm[, loss_mlm]} for a batch, as the original ``forward``.

        ``img_neg`` / ``txt_neg`` / ``mlm_inputs=(ids, labels)`` replace the random draws when given
        (reproducing a recorded step); otherwise they are drawn in the original's RNG order.
        """
        self.clip_contrastive_temperature()
        image_embeds, pooled_image = self.encode_image(image)
        text_embeds, pooled_text = self.encode_text(input_ids, attention_mask)
        loss_ita, sim_i2t, sim_t2i = self.get_contrastive_loss(pooled_image, pooled_text, idx)
        kv = self.text_encoder.cross_kv(image_embeds)  # once per video, for ITM's pairings and MLM
        loss_itm = self.get_itm_loss(sim_i2t, sim_t2i, text_embeds, attention_mask, image_embeds, idx,
                                     img_neg, txt_neg, kv)
        w = self.config.loss_weight
        out = dict(loss_ita=loss_ita * w.itc, loss_itm=loss_itm * w.itm)
        if self.has_mlm_head and w.mlm > 0:
            out["loss_mlm"] = self.get_mlm_loss(input_ids, attention_mask,
                                                image_embeds, mlm_inputs, kv) * w["mlm"]
        return out
