"""Model library: build a Singularity model from a config, or load one ready for inference.

    from singularity_ds.models import load_model
    model = load_model("singularity_temporal_17m.pth")          # original checkpoint
    model = load_model("runs/x/export", video_input={"num_frames": 12})
"""
import logging

from omegaconf import OmegaConf

from ..config import complete_config
from ..errors import CheckpointError, ConfigError
from ..hub import tower_folder
from .qa import SingularityQA
from .singularity import Singularity
from .weights import (
    checkpoint_config,
    load_into,
    load_text_tower,
    load_vision_tower,
    read_checkpoint,
    temporal_layers,
)

logger = logging.getLogger(__name__)

__all__ = ["Singularity", "SingularityQA", "build_model", "load_model", "is_qa_config", "follow_model_pixels",
           "CheckpointError"]


def follow_model_pixels(config, model) -> None:
    """``config``'s data transforms follow ``model``'s vision tower: its family (the original's
    normalisation) and, for a timm tower, its pixel statistics (inlined: no registry or Hub lookup)."""
    config.vit_type = model.vit_type
    if model.vit_type == "timm":
        config.timm_config_dict = model.vision_encoder.tower.inline()


def init_towers(model: Singularity, config) -> None:
    """``tower_init=pretrained``: load both towers from local Hugging Face folders or, as the original,
    Hub repo ids (downloaded into the HF cache, or read from it offline: :func:`..hub.tower_folder`).
    ``pretrained_text``: the text tower only (the vision tower starts random)."""
    vision = "timm_model" if config.vit_type == "timm" else "vit_name_or_pretrained_path"
    towers = [("text_encoder", load_text_tower), (vision, load_vision_tower)]
    for key, loader in towers[:1] if config.tower_init == "pretrained_text" else towers:
        if key == "timm_model":  # timm downloads (through hub.py) and filters its own weights
            model.vision_encoder.load_pretrained()
            continue
        if not config[key]:
            raise CheckpointError(f"config key {key!r} is empty: tower_init={config.tower_init} needs a "
                                  f"folder or Hub repo id, or set tower_init=random")
        loader(model, tower_folder(config[key], key))


def build_model(config, model_class=Singularity, strict: bool = True) -> Singularity:
    """A training-ready ``model_class`` (the task's): towers from ``pretrained_path`` or per
    ``tower_init``."""
    model = model_class(config)
    path = config.pretrained_path
    if path:
        state, _ = read_checkpoint(path)
        load_into(model, state, strict=strict, source=path)
    elif config.tower_init != "random":
        init_towers(model, config)
    return model


# what a checkpoint's weights fix: both towers' architectures, the tokenizer, the ITC projections (and a
# temporal checkpoint's encoder). A run that starts from it (pretrained_path) builds these as stored; the
# frames and image_res stay the config's (the original fine-tunes at its config's resolution and frames,
# interpolating the position tables and temporal embeddings).
CHECKPOINT_ARCH_KEYS = ("text_encoder", "bert_config", "bert_config_dict", "fusion_layer", "vit_type",
                        "vit_name_or_pretrained_path", "beit_config_dict", "vit_config_dict", "timm_model",
                        "timm_model_args", "timm_config_dict", "embed_dim")
# where the tokenizer and the architecture files are found, not what they are: a value the config sets
# wins (a local copy of bert-base-uncased, an offline BEiT folder)
CHECKPOINT_NAME_KEYS = ("text_encoder", "bert_config", "vit_name_or_pretrained_path")


def explicit_keys(config, base, overrides=()) -> set:
    """The top-level keys the user set: named in an override, or changed by an overlay (``base``: the
    config without overlays and overrides)."""
    given, plain = OmegaConf.to_container(config, resolve=False), OmegaConf.to_container(base, resolve=False)
    named = {o.split("=", 1)[0].strip().split(".")[0] for o in overrides}
    return named | {k for k in given.keys() | plain.keys() if given.get(k) != plain.get(k)}


def take_architecture(config, base, path: str, overrides=()) -> list:
    """Set ``config``'s architecture keys to those of the checkpoint at ``path`` (as :func:`load_model`
    builds it). ``base``: the same config without overlays and ``overrides``; a key they set (named in an
    override, or its value differs from ``base``'s) to something else than the checkpoint holds is one
    line, except where files are found (:data:`CHECKPOINT_NAME_KEYS`: the config's wins). -> the keys
    changed."""
    stored = complete_config(checkpoint_config(path))  # its data paths may not resolve here: keys one by one
    chosen = explicit_keys(config, base, overrides)
    changed = []
    # a temporal checkpoint's encoder too; a 1-frame one leaves the temporal keys to the config (the second
    # stage adds the encoder to the first stage's model)
    temporal = ("add_temporal_embed", "temporal_vision_encoder") if stored.temporal_vision_encoder.enable \
        else ()
    for key in CHECKPOINT_ARCH_KEYS + temporal:
        want, have = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                      for v in (stored[key], config[key]))
        if have == want:
            continue
        explicit = key in chosen
        if explicit and key in CHECKPOINT_NAME_KEYS:
            continue
        if explicit:
            shown = repr(have if not isinstance(have, dict) else "{...}")
            raise ConfigError(f"config key {key!r} is {shown} but pretrained_path {path} holds a model with "
                              f"{key}={want!r:.80}: drop the overlay or override that sets it (the "
                              f"architecture comes from the checkpoint), or start without pretrained_path")
        config[key] = want
        changed.append(key)
    return changed


def _with_overrides(stored: dict, overrides: dict) -> dict:
    cfg = OmegaConf.create(stored)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=True)  # dotted keys reach nested values
    return OmegaConf.to_container(cfg)


def model_tokenizer(model, source: str, name: str = None):
    """The tokenizer ``name`` (default: the one the model's config names, the one it was trained with),
    checked against the text tower: more words than its embeddings hold is one line naming ``source``."""
    from ..data.text import build_tokenizer
    name = name or model.config.text_encoder
    tokenizer = build_tokenizer(name)
    words = model.text_encoder.bert.embeddings.word_embeddings.num_embeddings
    if len(tokenizer) > words:
        raise ConfigError(f"tokenizer {name} has {len(tokenizer)} words but the text tower of {source} has "
                          f"{words}: pass the tokenizer it was trained with (text_encoder=FOLDER)")
    return tokenizer


def is_qa_config(config) -> bool:
    """A config of the QA task: ``task=train_qa``, or it names the answers to rank (``answer_list``; read
    unresolved, so an unset ``SL_DATA_DIR`` in it does not matter here)."""
    raw = OmegaConf.to_container(config, resolve=False) if OmegaConf.is_config(config) else dict(config)
    return raw.get("task") == "train_qa" or raw.get("answer_list") is not None


def is_qa_state(state: dict) -> bool:
    """A checkpoint of the QA model: it has the answer decoder."""
    return any(k.startswith("text_decoder.") for k in state)


def load_model(path: str, strict: bool = True, qa: bool = None, **overrides) -> Singularity:
    """A model in eval mode from an original Singularity checkpoint (``.pth``), or a folder written by
    :func:`singularity_ds.models.weights.export`. The architecture comes from the checkpoint's config
    (keys it lacks take the schema's defaults); ``overrides`` change config keys (nested as dicts, or
    dotted: ``**{"video_input.num_frames": 1}``). ``qa``: the QA model (answer decoder; initialised from
    the text tower if the file has none); by default QA exactly when the checkpoint has a decoder.
    """
    state, stored = read_checkpoint(path)
    stored = _with_overrides(stored, overrides)
    if "num_frames" not in stored.get("video_input", {}):  # the frames the temporal embeddings were made for
        n = state["temporal_embeddings"].shape[1] if "temporal_embeddings" in state else 1
        stored.setdefault("video_input", {})["num_frames"] = n
    try:
        cfg = complete_config(stored)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its config: {e}") from None
    layers = temporal_layers(state)
    if layers and not cfg.temporal_vision_encoder.enable:  # e.g. a config saved without the flags
        raise CheckpointError(
            f"{path}: has a {layers}-layer temporal encoder (a Singularity-temporal checkpoint) but its "
            f"config does not enable it: pass add_temporal_embed=True temporal_vision_encoder.enable=True "
            f"temporal_vision_encoder.num_layers={layers}")
    if qa is None:
        qa = is_qa_state(state)
    model = (SingularityQA if qa else Singularity)(cfg)
    load_into(model, state, strict=strict, source=path)
    return model.eval()
