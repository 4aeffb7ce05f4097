"""Checkpoint I/O: original Singularity ``.pth`` files, our exports, and HF tower folders.

Loading never executes pickled code: ``torch.load(weights_only=True)``, with the handful of OmegaConf
container classes the original pickles its config with allow-listed (they only restore attributes).
Key layouts are normalised onto the model's (pretraining layout, ``text_encoder.bert.*``); shape
changes the original handles are converted the same way (temporal embeddings clipped / zero-padded,
BEiT relative-position tables and ViT position embeddings interpolated to the new ``image_res``);
everything else that does not match is listed by name and refused unless ``strict=False``.
"""
import collections
import json
import logging
import os
import pickle
import re
import typing

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode, BooleanNode, BytesNode, FloatNode, IntegerNode, PathNode, StringNode

from ..errors import CheckpointError
from ..fileio import write_json

logger = logging.getLogger(__name__)

# What the original's pickled OmegaConf config needs, and nothing else.
SAFE_GLOBALS = [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, StringNode, IntegerNode,
                FloatNode, BooleanNode, BytesNode, PathNode, typing.Any, collections.defaultdict,
                dict, list, tuple, int, float, str, bool]  # builtins appear as type metadata

# Buffers that are recomputed, never learned: dropped from incoming state dicts.
DERIVED_BUFFERS = ("position_ids", "relative_position_index")

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"



def safe_load(path: str, mmap: bool = False) -> dict:
    """``torch.load`` without arbitrary pickle execution; a refused file gets one clear error. ``mmap``:
    tensors stay on disk until read (zip-format files; others are read whole)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:  # mmap needs the zip format: an older file is read whole
                if not mmap:
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        unsafe = next((line for line in lines if "GLOBAL" in line), None)  # torch names the blocked global
        if unsafe is None:
            raise CheckpointError(f"{path}: not a readable torch checkpoint "
                                  f"({lines[-1] if lines else e})") from None
        raise CheckpointError(
            f"{path}: refused to load: its pickle references code that is not plain tensors/containers "
            f"({unsafe.split('. Please')[0]}). Loading it could execute arbitrary code; load only "
            f"checkpoints you trust, converted with a trusted tool.") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({e})") from None


def plain_config(cfg) -> dict:
    """A checkpoint's config (dict or OmegaConf, maybe with unresolvable ``${...}``) as a plain dict."""
    if cfg is None:
        return {}
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # e.g. ${oc.env:SL_DATA_DIR} unset: keep what resolves, raw text otherwise
            out = {}
            for key in cfg.keys():
                try:
                    value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=True)
                    out[key] = (OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value)
                                else value)
                except Exception:
                    out[key] = OmegaConf.to_container(cfg, resolve=False)[key]
            return out
    return dict(cfg)


def temporal_layers(keys) -> int:
    """How many temporal-encoder layers a state dict's keys hold (0: a 1-frame Singularity checkpoint)."""
    return len({k.split(".")[2] for k in keys if k.startswith("temporal_vision_encoder.layer.")})


# ---------------------------------------------------------------------- shape conversions
def resize_temporal_embed(old: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The original's ``load_temp_embed_with_mismatch``: clip extra frames, zero-pad missing ones."""
    if old.shape[1] >= num_frames:
        return old[:, :num_frames].clone()
    new = old.new_zeros((old.shape[0], num_frames) + tuple(old.shape[2:]))
    new[:, : old.shape[1]] = old
    return new


def geometric_grid(src_size: int, dst_size: int):
    """BEiT's source positions (denser near 0, ratio q found by bisection) and target positions."""
    def progression(q, n):
        return (1.0 - q ** n) / (1.0 - q)

    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if progression(q, src_size // 2) > dst_size // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1
    for i in range(src_size // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    t = dst_size // 2.0
    return [-d for d in reversed(dis)] + [0] + dis, np.arange(-t, t + 0.1, 1.0), q


def interpolate_rel_pos_bias(table: torch.Tensor, dst_num: int) -> torch.Tensor:
    """BEiT relative-position table (src, H) -> (dst, H) by BEiT's geometric-grid cubic interpolation
    (the original calls scipy's ``interp2d(kind='cubic')``, removed from scipy; ``RectBivariateSpline``
    with s=0 is its documented replacement on a rectangular grid). The 3 [CLS] rows are kept."""
    from scipy.interpolate import RectBivariateSpline

    extra = 3
    src, heads = table.shape
    src_size, dst_size = int((src - extra) ** 0.5), int((dst_num - extra) ** 0.5)
    if src_size == dst_size:
        return table
    if src_size < 4:
        raise CheckpointError(f"relative-position table of a {src_size}x{src_size} grid is too small to "
                              f"interpolate (bicubic needs at least 4x4)")
    x, dx, _ = geometric_grid(src_size, dst_size)
    cols = []
    for h in range(heads):
        z = table[:-extra, h].view(src_size, src_size).float().numpy()
        spline = RectBivariateSpline(x, x, z, kx=3, ky=3, s=0)
        cols.append(torch.tensor(spline(dx, dx), dtype=torch.float32).reshape(-1, 1))
    return torch.cat([torch.cat(cols, dim=-1).to(table.dtype), table[-extra:]], dim=0)


def interpolate_pos_embed(old: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """ViT absolute position embeddings (1, 1+P_old, D) -> (1, num_tokens, D), bicubic on the grid."""
    if old.shape[1] == num_tokens:
        return old
    d = old.shape[-1]
    src, dst = int((old.shape[1] - 1) ** 0.5), int((num_tokens - 1) ** 0.5)
    grid = old[:, 1:].reshape(1, src, src, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return torch.cat([old[:, :1], grid.permute(0, 2, 3, 1).reshape(1, dst * dst, d).to(old.dtype)], dim=1)


# ---------------------------------------------------------------------- key layouts
def normalise_keys(state: dict, model) -> dict:
    """Map the original's layouts onto ours and drop derived/tied duplicates.

    - fine-tuned layout ``text_encoder.X`` -> ``text_encoder.bert.X`` (pretrain layout);
    - ``text_encoder.cls.predictions.decoder.{weight,bias}`` are tied to the word embeddings /
      ``predictions.bias`` in the original: checked equal, then dropped;
    - ``text_encoder.cls.*`` dropped when the model has no MLM head (as the original's fine-tuning init);
    - derived buffers (``position_ids``, ``relative_position_index``) dropped.
    """
    out = {}
    for k, v in state.items():
        if k.startswith("text_encoder.") and not k.startswith(("text_encoder.bert.", "text_encoder.cls.")):
            k = "text_encoder.bert." + k[len("text_encoder."):]
        if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        out[k] = v
    for tower in ("text_encoder", "text_decoder"):
        for tied, source in ((f"{tower}.cls.predictions.decoder.weight",
                              f"{tower}.bert.embeddings.word_embeddings.weight"),
                             (f"{tower}.cls.predictions.decoder.bias", f"{tower}.cls.predictions.bias")):
            if tied in out:
                if source in out and not torch.equal(out[tied], out[source]):
                    raise CheckpointError(f"{tied} differs from {source}; "
                                          f"this model ties them (as the original)")
                del out[tied]
    if hasattr(model, "text_decoder") and not any(k.startswith("text_decoder.") for k in out):
        out = decoder_from_text_tower(out, model.text_encoder.config.fusion_layer, model.state_dict())
    if not model.has_mlm_head:
        dropped = [k for k in out if k.startswith("text_encoder.cls.")]
        for k in dropped:
            del out[k]
        if dropped:
            logger.info("MLM head not used by this model; dropped %d text_encoder.cls.* keys", len(dropped))
    own = model.state_dict()
    layers = lambda keys: len({k.split(".")[4] for k in keys  # noqa: E731
                               if k.startswith("text_decoder.bert.encoder.layer.")})
    if hasattr(model, "text_decoder") and layers(out) != layers(own):
        raise CheckpointError(f"text_decoder: the checkpoint has {layers(out)} decoder layers, this model "
                              f"{layers(own)} (text layers - fusion_layer); check bert_config / fusion_layer")
    unused = [k for k in out if (k == "temp" or k.startswith(RETRIEVAL_HEADS)) and k not in own]
    for k in unused:  # the QA model has no retrieval heads or BEiT pooler (as the original's)
        del out[k]
    if unused:
        logger.info("dropped %d keys of heads this model does not have (%s)", len(unused),
                    ", ".join(sorted({k.split(".")[0] for k in unused})))
    return out


RETRIEVAL_HEADS = ("vision_proj.", "text_proj.", "itm_head.", "vision_encoder.pooler.")  # and "temp"


def decoder_from_text_tower(state: dict, fusion_layer: int, own: dict = None) -> dict:
    """QA from a retrieval/pretraining checkpoint, as the original's ``setup_model(has_decoder=True)``:
    the answer decoder gets the text tower's embeddings, its fusion layers ``[fusion_layer, N)`` as
    layers ``0..`` and the MLM head (which moves: the question encoder has none). With the model's
    ``own`` state, decoder tensors the text tower cannot give keep their fresh init, as in the
    original's non-strict load: the MLM head of a checkpoint pretrained without MLM, and cross-attention
    keys/values where the vision tower is narrower than the text tower (the decoder attends to the
    question, the text tower's fusion layers to the video; the original's towers are equally wide)."""
    out = {}
    for k, v in state.items():
        if k.startswith("text_encoder.cls."):
            out["text_decoder." + k[len("text_encoder."):]] = v
            continue
        out[k] = v
        if k.startswith("text_encoder.bert.embeddings."):
            out["text_decoder." + k[len("text_encoder."):]] = v
        elif k.startswith("text_encoder.bert.encoder.layer."):
            parts = k.split(".")
            if int(parts[4]) >= fusion_layer:
                parts[4] = str(int(parts[4]) - fusion_layer)
                out[".".join(["text_decoder"] + parts[1:])] = v
    logger.info("answer decoder initialised from the text tower's embeddings, layers [%d, N) and MLM head",
                fusion_layer)
    if own is not None:
        fresh = [k for k in own if k.startswith("text_decoder.") and ".cls.predictions.decoder." not in k
                 and (k not in out or out[k].shape != own[k].shape)]  # the tied output layer is not a key
        for k in fresh:
            out[k] = own[k]
        if fresh:
            logger.warning("answer decoder: %d tensors newly initialised (not in the text tower, or of "
                           "another width): %s", len(fresh), ", ".join(fresh[:8]))
    return out


def _resized_rel_pos_bias(table: torch.Tensor, dst_num: int, vision_cfg, source: str, key: str):
    """:func:`interpolate_rel_pos_bias`; a table too small to resize is refused naming the file, the
    tensor and the config key (``image_res``) with the resolution the table was trained at."""
    try:
        return interpolate_rel_pos_bias(table, dst_num)
    except CheckpointError as e:
        patches = (int((table.shape[0] - 3) ** 0.5) + 1) // 2
        trained = patches * vision_cfg.patch_size
        raise CheckpointError(
            f"{source}: {key}: {e}, so it cannot follow image_res={vision_cfg.image_size}; it was trained at "
            f"image_res={trained} ({patches}x{patches} patches of {vision_cfg.patch_size} px): load it with "
            f"image_res={trained}") from None


def adapt_shapes(state: dict, model, source: str = "checkpoint") -> dict:
    """Convert the shape changes the original converts; everything else is left for the report."""
    own = model.state_dict()
    for k, v in list(state.items()):
        if k not in own or own[k].shape == v.shape:
            continue
        if k == "temp" and v.numel() == 1:  # the original's 0-dim temperature
            state[k] = v.reshape(own[k].shape)
        elif k == "temporal_embeddings":
            logger.info("temporal_embeddings: %d -> %d frames (clip / zero-pad)", v.shape[1], own[k].shape[1])
            state[k] = resize_temporal_embed(v, own[k].shape[1])
        elif k.endswith("relative_position_bias_table") and v.shape[1] == own[k].shape[1]:
            logger.info("%s: interpolated %s -> %s", k, tuple(v.shape), tuple(own[k].shape))
            state[k] = _resized_rel_pos_bias(v, own[k].shape[0], model.vision_encoder.config, source, k)
        elif k.endswith("embeddings.position_embeddings") and k.startswith("vision_encoder."):
            state[k] = interpolate_pos_embed(v, own[k].shape[1])
        elif k == "vision_encoder.model.pos_embed" and model.vit_type == "timm":  # timm's own resampling
            logger.info("%s: resampled %s -> %s", k, tuple(v.shape), tuple(own[k].shape))
            state[k] = model.vision_encoder.resample_pos_embed(v)
    return state


def load_into(model, state: dict, strict: bool = True, source: str = "checkpoint",
              new_modules: tuple = ("temporal_vision_encoder.",)):
    """Load ``state`` into ``model`` and report missing / unexpected / mismatched keys by name.

    Keys under ``new_modules`` may be missing (a module the checkpoint predates, e.g. the temporal
    encoder in second-stage pretraining from a single-frame checkpoint): they keep their fresh init
    and are logged. Anything else that does not match raises :class:`CheckpointError` when ``strict``.
    """
    state = adapt_shapes(normalise_keys(state, model), model, source)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    newly_init = [k for k in missing if k.startswith(new_modules)]
    missing = [k for k in missing if not k.startswith(new_modules)]
    if newly_init:
        logger.warning("%s: %d keys not in the checkpoint, newly initialised: %s", source, len(newly_init),
                       sorted({k.split(".")[0] for k in newly_init}))
    problems = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {name} key(s): " + ", ".join(keys[:20])
                            + (" ..." if len(keys) > 20 else ""))
    if problems and strict:
        raise CheckpointError(f"{source}: does not match the model (pass strict=False to load anyway):\n  "
                              + "\n  ".join(problems))
    for p in problems:
        logger.warning("%s: %s", source, p)
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return dict(missing=missing, unexpected=unexpected, mismatched=mismatched, newly_initialised=newly_init)


# ---------------------------------------------------------------------- whole-model files
def read_safetensors(path: str, remedy: str, header_only: bool = False) -> dict:
    """A safetensors file's tensors (``header_only``: only check that it is readable, -> ``{}``); an empty,
    cut-short or foreign file is one :class:`CheckpointError` naming it and saying what to do
    (``remedy``)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        if header_only:
            with safe_open(path, "pt"):
                return {}
        return load_file(path)
    except (SafetensorError, OSError) as e:
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes; "
                              f"{str(e).strip()[:160]}); {remedy}") from None


def read_config_json(path: str, remedy: str) -> dict:
    """A model folder's ``config.json`` as a dict; invalid JSON is one :class:`CheckpointError` naming the
    file, the position and what to do (``remedy``)."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                              f"{remedy}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); {remedy}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object of config keys, got {type(cfg).__name__}; "
                              f"{remedy}")
    return cfg


EXPORT_REMEDY = ("the export is damaged (an interrupted copy?): copy it again, or export it again from the "
                 "run's checkpoints (a training run writes export/ from its latest checkpoint)")


def checkpoint_config(path: str) -> dict:
    """The plain config dict of an original ``.pth`` or an export folder, without reading its weights."""
    if os.path.isdir(path):
        weights, cfg_path = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
        if not (os.path.isfile(weights) and os.path.isfile(cfg_path)):
            raise CheckpointError(f"{path}: a model folder needs {WEIGHTS_NAME} and {CONFIG_NAME}")
        # a damaged weights file is the problem to name, not the architecture its config implies
        read_safetensors(weights, EXPORT_REMEDY, header_only=True)
        return read_config_json(cfg_path, EXPORT_REMEDY)
    ckpt = safe_load(path, mmap=True)  # the tensors stay on disk
    return plain_config(ckpt.get("config")) if isinstance(ckpt, dict) else {}


def read_checkpoint(path: str):
    """-> (state_dict, plain config dict) from an original ``.pth`` or one of our export folders."""
    if os.path.isdir(path):
        weights, cfg_path = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
        if not (os.path.isfile(weights) and os.path.isfile(cfg_path)):
            raise CheckpointError(f"{path}: a model folder needs {WEIGHTS_NAME} and {CONFIG_NAME}")
        cfg = read_config_json(cfg_path, EXPORT_REMEDY)
        return read_safetensors(weights, EXPORT_REMEDY), cfg
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict (the original's format); "
                              f"got {type(ckpt).__name__} with keys "
                              f"{list(ckpt)[:8] if isinstance(ckpt, dict) else ''}")
    return ckpt["model"], plain_config(ckpt.get("config"))


def export(model, folder: str):
    """Write ``model.safetensors`` (fp32 unless the model is in another dtype) + ``config.json``.

    The config is self-contained: besides ``image_res``, the frames and every other key, it inlines both
    towers' architectures (``bert_config_dict``, ``beit_config_dict`` / ``vit_config_dict``), so the
    folder loads wherever it is copied, without the architecture files or Hugging Face folders the
    training config named."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(folder, WEIGHTS_NAME + ".tmp")
    save_file(state, tmp, metadata={"format": "pt", "producer": "singularity-ds"})
    os.replace(tmp, os.path.join(folder, WEIGHTS_NAME))
    write_json(self_contained_config(model.config), os.path.join(folder, CONFIG_NAME), indent=2)


ARCH_META_KEYS = ("transformers_version", "architectures", "model_type", "_name_or_path", "torch_dtype",
                  "dtype")


def self_contained_config(config) -> dict:
    """``config`` as a plain dict with both towers' architectures inlined (see :func:`export`)."""
    from ..timm_hub import resolve
    from .arch import bert_config, vision_config

    cfg = plain_config(config)
    text = bert_config(config).to_dict()
    cfg["bert_config_dict"] = {k: v for k, v in text.items() if k not in ARCH_META_KEYS}
    if cfg["vit_type"] == "timm":  # timm_model_args are inside the inline model_args
        cfg["timm_config_dict"], cfg["timm_model_args"] = resolve(config).inline(), {}
        return cfg
    vision = vision_config(config).to_dict()
    vision.pop("image_size", None)  # follows image_res
    cfg["beit_config_dict" if cfg["vit_type"] == "beit" else "vit_config_dict"] = {
        k: v for k, v in vision.items() if k not in ARCH_META_KEYS}
    return cfg


# ---------------------------------------------------------------------- pretrained towers (HF folders)
def _hf_state(folder: str) -> dict:
    st, binf = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st, "download or copy the Hugging Face folder again")
    if os.path.isfile(binf):
        return safe_load(binf)
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def load_text_tower(model, folder: str) -> dict:
    """Initialise the text tower from a Hugging Face BERT folder (``BertModel`` or ``BertForMaskedLM``
    keys). Layers keep their index, so the fusion layers ``[fusion_layer, N)`` start from the top
    BERT layers, as the original; cross-attention stays newly initialised."""
    state = {}
    for k, v in _hf_state(folder).items():
        k = k[len("bert."):] if k.startswith("bert.") else k
        if k.startswith(("pooler.", "cls.seq_relationship")) or k.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue  # BERT's NSP pooler is not used (the original builds BertModel without it)
        state[k if k.startswith("cls.") else "bert." + k] = v
    tower = model.text_encoder
    if tower.cls is None:
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
    state.pop("cls.predictions.decoder.weight", None)
    state.pop("cls.predictions.decoder.bias", None)
    own = tower.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    if bad or unexpected:
        raise CheckpointError(f"{folder}: does not fit the text tower: " + ", ".join(bad + unexpected)[:2000])
    tower.load_state_dict(state, strict=False)
    missing = [k for k in own if k not in state]
    if any(".crossattention." not in k and not k.startswith("cls.") for k in missing):
        raise CheckpointError(f"{folder}: text tower keys missing: "
                              f"{[k for k in missing if '.crossattention.' not in k][:10]}")
    logger.info("text tower <- %s (%d tensors; %d cross-attention/head tensors newly initialised)",
                folder, len(state), len(missing))
    return dict(loaded=sorted(state), newly_initialised=missing)


# transformers >= 5 saves ViT/BEiT with new names; map them onto the original's (4.x) names.
_HF5_VISION_NAMES = [(re.compile(a), b) for a, b in [
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.relative_position_bias\.",
     r"encoder.layer.\1.attention.attention.relative_position_bias."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
]]


def _hf4_vision_name(key: str) -> str:
    for pattern, repl in _HF5_VISION_NAMES:
        new = pattern.sub(repl, key)
        if new != key:
            return new
    return key


def load_vision_tower(model, folder: str) -> dict:
    """Initialise the vision tower from a Hugging Face BEiT/ViT/DeiT folder, interpolating position
    tables to ``image_res``."""
    state = {}
    for k, v in _hf_state(folder).items():
        for prefix in ("beit.", "vit.", "deit."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(("classifier.",
                         "lm_head.", "layernorm.") if model.vit_type == "beit" else ("classifier.",)):
            continue
        if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS or k == "embeddings.mask_token":
            continue
        state[_hf4_vision_name(k)] = v
    tower = model.vision_encoder
    own = tower.state_dict()
    for k, v in list(state.items()):
        if k in own and own[k].shape != v.shape:
            if k.endswith("relative_position_bias_table"):
                state[k] = _resized_rel_pos_bias(v, own[k].shape[0], tower.config, folder, k)
            elif k == "embeddings.position_embeddings":
                state[k] = interpolate_pos_embed(v, own[k].shape[1])
    problems = [k for k in state if k not in own or own[k].shape != state[k].shape]
    problems += [k for k in own if k not in state]
    if problems:
        raise CheckpointError(f"{folder}: does not fit the vision tower: {problems[:20]}")
    tower.load_state_dict(state)
    return dict(loaded=sorted(state))
