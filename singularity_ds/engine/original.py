"""The ORIGINAL Singularity code's pretraining step, built from a user's clone of
github.com/jayleicn/singularity, for ``bench train --original PATH`` (side-by-side timing).

Nothing of the original is copied here: its ``models/`` package is imported from the clone. The
original was written for transformers 4.15; with the installed transformers the import needs a few
names that moved, which :func:`_shim_transformers` puts back where the original looks for them (the
same functions, from their new modules; the 4.15 mask helpers are reproduced in two lines each).
BEiT runs with ``attn_implementation="eager"``: explicit softmax attention, as 4.15's BEiT did
(newer BEiT could otherwise pick SDPA, which would not be the original's computation).
Towers start random (``from_pretrained`` is bypassed) with the architecture of our config: speed does
not depend on the weights.
"""
import importlib
import os
import sys
import types

import torch

from ..errors import ConfigError

REQUIRED = ("models/model_pretrain.py", "models/model_retrieval.py", "models/model_retrieval_base.py",
            "models/xbert.py", "utils/optimizer.py")


def _shim_transformers():
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        def find_pruneable_heads_and_indices(*args, **kwargs):  # head pruning: never called by a step
            raise NotImplementedError("head pruning is not available in the side-by-side original")
        mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices


def _add_mask_helpers(cls):
    """transformers 4.15's ``init_weights`` (5.x's needs ``post_init``), ``invert_attention_mask`` and
    ``get_head_mask`` (removed in 5.x)."""
    def init_weights(self):  # 4.15: initialise every module, then tie the MLM decoder to the embeddings
        self.apply(self._init_weights)
        out = self.get_output_embeddings() if hasattr(self, "get_output_embeddings") else None
        if out is not None and self.config.tie_word_embeddings:
            out.weight = self.get_input_embeddings().weight
    cls.init_weights = init_weights
    if not hasattr(cls, "invert_attention_mask"):
        def invert_attention_mask(self, mask):
            mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
            return (1.0 - mask.to(self.dtype)) * -10000.0
        cls.invert_attention_mask = invert_attention_mask
    if not hasattr(cls, "get_head_mask"):
        cls.get_head_mask = lambda self, head_mask, num_layers: [None] * num_layers


def load_original(path: str):
    """Import the clone's ``models`` package (as a top-level package, as its scripts do)."""
    path = os.path.abspath(path)
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ConfigError(f"--original {path}: not a clone of github.com/jayleicn/singularity "
                          f"(missing {', '.join(missing)}); clone it and pass its folder")
    _shim_transformers()
    if "models" in sys.modules and not getattr(sys.modules["models"], "__file__", "").startswith(path):
        raise ConfigError(f"--original {path}: another package named 'models' is already imported "
                          f"({sys.modules['models'].__file__})")
    sys.path.insert(0, path)
    try:
        xbert = importlib.import_module("models.xbert")
        importlib.import_module("models.model_retrieval_base")
        pretrain = importlib.import_module("models.model_pretrain")
        retrieval = importlib.import_module("models.model_retrieval")
    finally:
        sys.path.remove(path)
    _add_mask_helpers(xbert.BertPreTrainedModel)
    return xbert, pretrain, retrieval


def original_config(path: str, config, bert_json: str = None):
    """The original's config fields its model reads, from our (same-named) config. ``bert_json``: the BERT
    config file its temporal encoder reads (default: the clone's ``configs/config_bert.json``)."""
    from omegaconf import OmegaConf
    return OmegaConf.create(dict(
        embed_dim=config.embed_dim, temp=config.temp, mlm_prob=config.mlm_prob,
        itm_hard_neg=config.itm_hard_neg, image_res=config.image_res, vit_type="beit",
        vit_name_or_pretrained_path="microsoft/beit-base-patch16-224-pt22k-ft22k",
        text_encoder="bert-base-uncased",
        # its temporal encoder reads this JSON itself (relative to its repo, as its configs give it)
        bert_config=bert_json or os.path.join(os.path.abspath(path), "configs", "config_bert.json"),
        add_temporal_embed=config.add_temporal_embed,
        video_input=dict(num_frames=config.video_input.num_frames),
        temporal_vision_encoder=dict(enable=config.temporal_vision_encoder.enable,
                                     num_layers=config.temporal_vision_encoder.num_layers,
                                     update_pooler_embed=config.temporal_vision_encoder.update_pooler_embed),
        loss_weight=dict(itc=config.loss_weight.itc, itm=config.loss_weight.itm, mlm=config.loss_weight.mlm),
        debug=False))


def build_original(path: str, config, retrieval: bool = False, bert_json: str = None):
    """The original's pretraining ``Singularity`` model (``retrieval``: its retrieval model, whose text
    tower is a ``BertModel``) with random towers of OUR config's architecture (``models/arch.py``: the
    same BEiT and BERT configs as ours; the base config's are the clone's ``configs/*.json``), its tokenizer
    ids from ours. ``bert_json``: see :func:`original_config`."""
    from transformers import BeitModel

    from ..models.arch import bert_config, vision_config

    if config.vit_type != "beit":
        raise ConfigError(f"--original: vit_type={config.vit_type!r}; the side-by-side step builds BEiT")
    xbert, pretrain, retrieval_module = load_original(path)
    vision = vision_config(config)
    if vision.hidden_size != 768 or bert_config(config).hidden_size != 768:
        raise ConfigError("--original: the original code hard-codes 768-wide towers; this config's are "
                          f"{vision.hidden_size} / {bert_config(config).hidden_size} (the tiny overlay "
                          "is 128): use 768-wide architectures")
    vision._attn_implementation = "eager"

    def build_vit(cls, model_card, image_size):
        return BeitModel(vision, add_pooling_layer=True)

    def build_text(self):
        if retrieval:
            return xbert.BertModel(bert_config(config), add_pooling_layer=False)
        return xbert.BertForMaskedLM(bert_config(config))

    cls = retrieval_module.Singularity if retrieval else pretrain.Singularity
    saved = cls.build_huggingface_vit_with_image_size, cls.build_text_encoder
    cls.build_huggingface_vit_with_image_size = classmethod(build_vit)
    cls.build_text_encoder = build_text
    try:
        tok = types.SimpleNamespace(pad_token_id=0, cls_token_id=101, mask_token_id=103)
        return cls(config=original_config(path, config, bert_json), tokenizer=tok)
    finally:
        cls.build_huggingface_vit_with_image_size, cls.build_text_encoder = saved


def original_optimizer(path: str, model, config):
    """The original's AdamW: its weight-decay groups (no decay on biases and 1-d weights)."""
    sys.path.insert(0, os.path.abspath(path))
    try:
        opt = importlib.import_module("utils.optimizer")
    finally:
        sys.path.remove(os.path.abspath(path))
    groups = opt.create_optimizer_params_group(opt.add_different_lr(
        opt.add_weight_decay(model, config.optimizer.weight_decay), [], None, config.optimizer.lr))
    return torch.optim.AdamW(groups, lr=config.optimizer.lr, betas=tuple(config.optimizer.opt_betas),
                             weight_decay=config.optimizer.weight_decay)


class OriginalStep:
    """One training step of the original as its ``tasks/pretrain.py::train`` runs it in fp32
    (``fp16=False``: the GradScaler is a no-op): forward, ``zero_grad``, backward, ``optimizer.step``."""

    def __init__(self, path, config, batch, device):
        torch.manual_seed(0)
        self.model = build_original(path, config).to(device).train()
        self.optimizer = original_optimizer(path, self.model, config)
        from transformers import BatchEncoding
        self.image = batch["media"].to(device)
        self.text = BatchEncoding(dict(input_ids=batch["input_ids"].to(device),
                                       attention_mask=batch["attention_mask"].to(device)))
        self.idx = batch["idx"].to(device)

    def parameters(self):
        return self.model.parameters()

    def forward(self):
        losses = self.model(self.image, self.text, idx=self.idx)
        return sum(losses.values())

    def backward(self, loss):
        self.optimizer.zero_grad()
        loss.backward()

    def step(self):
        self.optimizer.step()
