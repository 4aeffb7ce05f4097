"""A timm ViT-family model as the Singularity vision tower (``vit_type=timm``).

timm builds the model (``timm.create_model(architecture, num_classes=0, img_size=image_res, **model_args)``,
:mod:`..timm_hub` says which); nothing of it is re-implemented here. The tower gives what the BEiT tower
gives: ``forward(pixels (N, C, H, W)) -> (tokens (N, prefix + patches, D), pooled (N, D))`` where the tokens
are timm's ``forward_features`` (prefix tokens, i.e. [CLS] and registers, first, as timm orders them) and
pooled is timm's own pooling of them (``forward_head(pre_logits=True)``: [CLS], mean, or SigLIP's attention
pool), the vector the ITC projection reads. Its width is the model's ``num_features``.

- Pretrained weights load through timm's own checkpoint filter (``create_model(pretrained=True)`` on the
  downloaded file), which resamples position embeddings to ``image_res`` with timm's
  ``resample_abs_pos_embed``; our own checkpoints at another resolution go through the same function
  (:meth:`resample_pos_embed`).
- Random init is timm's (each family's own scheme), not the BERT-style init the BEiT tower gets.
- ``gradient_checkpointing`` is timm's ``set_grad_checkpointing``; attention is timm's fused SDPA path
  (``fused_attn``; ``attention_impl=math`` turns it off). Why not the project's attention function: it
  calls the same SDPA kernel for these shapes (no mask, no bias), so routing timm's blocks through it
  would mean patching each family's attention module for no speed (docs/benchmarks.md measures both).
"""
import contextlib

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..timm_hub import TimmTower, weights_file


def create(tower: TimmTower, image_res: int, pretrained: bool = False, device=None) -> nn.Module:
    import timm
    kwargs = dict(tower.model_args, num_classes=0, img_size=image_res)
    cfg = dict(tower.pretrained_cfg, architecture=tower.architecture)
    overlay = None
    if pretrained:
        # timm reads a pretrained_cfg's 'file' before its hub id: the file hub.py fetched (one-line errors)
        overlay = dict(file=weights_file(tower), hf_hub_id=None, url=None, source=None)
    cfg.pop("source", None)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return timm.create_model(tower.architecture, pretrained=pretrained, pretrained_cfg=cfg,
                                     pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as e:  # an argument this architecture does not take
        if "img_size" in str(e):  # every ViT-family model takes one
            raise ConfigError(not_a_vit(tower.architecture)) from None
        raise ConfigError(f"config key 'timm_model_args': timm {tower.architecture}: {e}") from None
    except (RuntimeError, ValueError, KeyError) as e:
        what = "loading its pretrained weights" if pretrained else "building it"
        raise CheckpointError(f"config key 'timm_model': timm {tower.architecture}: {what} failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def not_a_vit(architecture: str) -> str:
    return (f"config key 'timm_model': timm {architecture} is not a ViT-family model (no patch tokens: "
            f"patch_embed + blocks); pick a ViT, e.g. vit_base_patch16_clip_224.openai")


class TimmVisionTower(nn.Module):
    def __init__(self, tower: TimmTower, image_res: int):
        super().__init__()
        self.tower = tower
        self.model = create(tower, image_res)
        m = self.model
        if not (hasattr(m, "patch_embed") and hasattr(m, "blocks") and hasattr(m, "forward_head")):
            raise ConfigError(not_a_vit(tower.architecture))
        self.patch_size = int(m.patch_embed.patch_size[0])
        if image_res % self.patch_size:
            raise ConfigError(f"image_res={image_res} is not a multiple of the timm tower's patch size "
                              f"{self.patch_size} ({tower.architecture})")
        self.width = int(m.num_features)
        self.num_prefix_tokens = int(getattr(m, "num_prefix_tokens", 1))
        self.grid = tuple(int(g) for g in m.patch_embed.grid_size)
        self.num_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.depth = len(m.blocks)
        self.image_res = image_res
        self.pooled_output = True  # the QA model reads tokens only

    # the Singularity model's switches
    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.model, "grad_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool):
        self.model.set_grad_checkpointing(enable)

    def set_attention_impl(self, impl: str):
        """timm's attention modules: their fused SDPA path, or explicit matmuls for ``math``."""
        for module in self.model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = impl != "math"

    def load_pretrained(self):
        """The tower's pretrained weights, through timm's checkpoint filter (position embeddings resampled to
        ``image_res``, the classifier dropped)."""
        source = create(self.tower, self.image_res, pretrained=True)
        self.model.load_state_dict(source.state_dict())
        return dict(loaded=sorted(source.state_dict()))

    def resample_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        """A position embedding of another grid (our checkpoint at another image_res) -> this tower's,
        with timm's own function."""
        from timm.layers import resample_abs_pos_embed
        prefix = 0 if getattr(self.model, "no_embed_class", False) else self.num_prefix_tokens
        return resample_abs_pos_embed(pos_embed, new_size=list(self.grid), num_prefix_tokens=prefix)

    def forward(self, pixels):
        tokens = self.model.forward_features(pixels)
        pooled = self.model.forward_head(tokens, pre_logits=True) if self.pooled_output else None
        return tokens, pooled
