"""Resolve the two towers' architecture configs, as ``transformers`` config objects.

Sources, first match wins:
- BERT: ``bert_config_dict`` (inline, as the reference fixtures carry), else the ``bert_config`` JSON
  path (absolute/relative, or a file shipped in ``singularity_ds/configs/arch/`` such as the original's
  ``configs/config_bert.json``), else ``config.json`` of a local ``text_encoder`` folder.
- Vision: ``beit_config_dict`` / ``vit_config_dict``, else ``vit_name_or_pretrained_path`` as a local
  HF folder, or a hub name whose architecture JSON is shipped (e.g. BEiT-base pt22k-ft22k).
- Otherwise a Hub repo id's ``config.json`` (``bert_config: null`` + ``text_encoder``, or
  ``vit_name_or_pretrained_path``) from the Hugging Face cache, downloaded if online (:mod:`..hub`).
``image_size`` always follows ``image_res``; ``encoder_width`` follows the vision width.
"""
import json
import os
from importlib import resources

from omegaconf import OmegaConf
from transformers import BeitConfig, BertConfig, ViTConfig

from ..hub import tower_folder

ARCH_DIR = resources.files("singularity_ds") / "configs" / "arch"


def _packaged(name: str):
    """A shipped architecture JSON by basename (``configs/config_bert.json`` -> ``config_bert.json``)."""
    base = os.path.basename(str(name).rstrip("/"))
    for cand in (base, base + ".json"):
        path = ARCH_DIR / cand
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _plain(d) -> dict:
    """An inline architecture as plain Python values (transformers validates lists as ``list``, not an
    OmegaConf ListConfig)."""
    return OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else dict(d)


def _read_json(path: str, key: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"config key {key!r}: cannot read architecture file {path}: {e}") from None


def bert_config(config) -> BertConfig:
    d = config["bert_config_dict"]
    if d is None:
        path, enc = config["bert_config"], config["text_encoder"]
        if path and os.path.isfile(path):
            d = _read_json(path, "bert_config")
        elif path and _packaged(path) is not None:
            d = _packaged(path)
        elif enc and os.path.isfile(os.path.join(enc, "config.json")):
            d = _read_json(os.path.join(enc, "config.json"), "text_encoder")
        elif enc and not path and not os.path.isdir(enc):  # a Hub repo id: its config.json (cached/fetched)
            d = _read_json(os.path.join(tower_folder(enc, "text_encoder", weights=False), "config.json"),
                           "text_encoder")
        else:
            raise ValueError(f"config key 'bert_config': no architecture file {path!r} (not on disk, not "
                             f"shipped in {ARCH_DIR}), and text_encoder={enc!r} is not a local folder")
    d = _plain(d)
    if config["fusion_layer"] is not None:
        d["fusion_layer"] = int(config["fusion_layer"])
    d.setdefault("fusion_layer", d["num_hidden_layers"])
    if not 0 <= d["fusion_layer"] <= d["num_hidden_layers"]:
        raise ValueError(f"fusion_layer={d['fusion_layer']} is outside [0, {d['num_hidden_layers']}]")
    return BertConfig(**d)


def vision_config(config):
    vit_type = config["vit_type"]
    d = config["beit_config_dict"] if vit_type == "beit" else config["vit_config_dict"]
    if d is None:
        name = config["vit_name_or_pretrained_path"]
        if name and os.path.isfile(os.path.join(name, "config.json")):
            d = _read_json(os.path.join(name, "config.json"), "vit_name_or_pretrained_path")
        elif name and _packaged(name) is not None:
            d = _packaged(name)
        elif name and not os.path.isdir(name):  # a Hub repo id: its config.json (cached or fetched)
            d = _read_json(os.path.join(tower_folder(name, "vit_name_or_pretrained_path", weights=False),
                                        "config.json"), "vit_name_or_pretrained_path")
        else:
            raise ValueError(f"config key 'vit_name_or_pretrained_path': {name!r} is neither a local folder "
                             f"with config.json nor a shipped architecture in {ARCH_DIR}")
    d = _plain(d)
    d["image_size"] = int(config["image_res"])
    if d["image_size"] % d["patch_size"]:
        raise ValueError(f"image_res={d['image_size']} is not a multiple of patch_size={d['patch_size']}")
    d.pop("model_type", None)
    return (BeitConfig if vit_type == "beit" else ViTConfig)(**d)


def temporal_config(bert: BertConfig, vision_width: int, num_layers: int) -> BertConfig:
    """The original builds the temporal encoder from the BERT config with ``num_layers`` layers and
    no cross-attention (``fusion_layer = num_layers``); it runs on vision tokens, hence their width."""
    d = bert.to_dict()
    d.update(num_hidden_layers=num_layers, fusion_layer=num_layers, hidden_size=vision_width)
    if vision_width != bert.hidden_size:  # towers of different widths (the original's are both 768; e.g.
        # MiniLM, 384 wide, on the tiny 128-wide ViT): keep the text tower's head size and FFN ratio
        head = bert.hidden_size // bert.num_attention_heads
        d.update(num_attention_heads=max(1, vision_width // head),
                 intermediate_size=bert.intermediate_size * vision_width // bert.hidden_size)
    return BertConfig(**d)


def decoder_config(bert: BertConfig, config=None) -> BertConfig:
    """The QA answer decoder: as many layers as the text tower's fusion layers, each with causal
    self-attention and cross-attention to the question states (the original hard-codes 3 = 12 - 9).
    An inline ``text_decoder_config_dict`` (as the reference fixture stores) wins."""
    inline = config["text_decoder_config_dict"] if config is not None else None
    if inline is not None:
        d = dict(inline)
        d.setdefault("encoder_width", d["hidden_size"])
        return BertConfig(**d)
    d = bert.to_dict()
    d.update(num_hidden_layers=bert.num_hidden_layers - bert.fusion_layer, fusion_layer=0,
             encoder_width=bert.hidden_size)
    return BertConfig(**d)
