"""timm vision towers by name: what a name means and where its weights are, without building the model.

``vit_type=timm`` with config key ``timm_model`` set to one of:

- a name timm registers, ``NAME`` or ``NAME.TAG`` (``timm.list_pretrained()`` lists them, e.g.
  ``vit_base_patch16_clip_224.openai``): the architecture and its ``pretrained_cfg`` come from timm's own
  registry (no download); the weights from that cfg's Hugging Face Hub repo (``hf_hub_id``);
- a Hub repo in timm's layout, ``org/name`` or ``hf-hub:org/name``
  (``timm/vit_base_patch16_clip_224.openai``): its ``config.json`` (``architecture``, ``model_args``,
  ``pretrained_cfg``) and ``model.safetensors``, as ``timm.create_model("hf-hub:...")`` reads them;
- a local folder in that layout (also written as timm's ``local-dir:PATH``), e.g. an ``export --hf``'s
  ``vision_encoder/`` of a timm tower.

``timm_config_dict`` (the resolved architecture, model args and pixel statistics inline, as exports store
it) wins over the name: no registry lookup, no Hub. ``timm_model_args`` are extra ``timm.create_model``
keyword arguments (``drop_path_rate``; ``embed_dim`` / ``depth`` / ``num_heads`` for a small random tower).

The pixel statistics (mean, std, interpolation) the data transforms use come from here, i.e. from the
tower's ``pretrained_cfg``, never from a table of ours. Downloads go through :mod:`.hub`: the Hugging Face
cache, ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE``, and the same one-line errors as the BERT and BEiT towers.
"""
import difflib
import json
import os
from dataclasses import dataclass, field

from .errors import CheckpointError, ConfigError
from .hub import _fetch

KEY = "timm_model"
# What an inline tower keeps of a pretrained_cfg: what the transforms read, and where the weights came from.
PIXEL_KEYS = ("mean", "std", "interpolation")
SOURCE_KEYS = ("hf_hub_id", "tag", "license")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's own order for Hub repos


@dataclass(frozen=True)
class TimmTower:
    architecture: str
    model_args: dict = field(default_factory=dict)
    pretrained_cfg: dict = field(default_factory=dict)
    weights_repo: str = None  # Hub repo id or local folder holding the weights (None: none known)

    @property
    def mean(self):
        return tuple(self.pretrained_cfg.get("mean", (0.485, 0.456, 0.406)))

    @property
    def std(self):
        return tuple(self.pretrained_cfg.get("std", (0.229, 0.224, 0.225)))

    @property
    def interpolation(self) -> str:
        return self.pretrained_cfg.get("interpolation", "bicubic")

    def inline(self) -> dict:
        """The ``timm_config_dict`` an export stores: enough to rebuild the tower and its transforms
        offline."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in self.pretrained_cfg.items()
               if k in PIXEL_KEYS + SOURCE_KEYS and v is not None}
        return dict(architecture=self.architecture, model_args=dict(self.model_args), pretrained_cfg=cfg,
                    weights_repo=self.weights_repo)


def _known_models():
    import timm
    return timm.list_models()


def close_names(name: str, n: int = 6) -> list:
    """timm names near ``name``: the registered models sharing its family prefix (``timm.list_models`` with
    a pattern), nearest first."""
    import timm
    arch = name.split(".")[0]
    family = timm.list_models(f"{arch.split('_')[0]}*") or _known_models()
    return difflib.get_close_matches(arch, family, n=n, cutoff=0.5) or family[:n]


def _check_architecture(arch: str, name: str):
    import timm
    if not timm.is_model(arch):
        raise ConfigError(f"config key {KEY!r}: {name!r} is not a timm model; close timm names: "
                          f"{', '.join(close_names(arch))} (all: timm.list_models('*PATTERN*'))")


def _from_registry(name: str) -> TimmTower:
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag
    arch, tag = split_model_name_tag(name)
    _check_architecture(arch, name)
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(f"{arch}.*")
        raise ConfigError(f"config key {KEY!r}: timm has no pretrained tag {tag!r} for {arch}; its tags: "
                          f"{', '.join(tags) or 'none'}")
    cfg = cfg.to_dict()
    return TimmTower(arch, {}, cfg, cfg.get("hf_hub_id"))


def _parse_config_json(path: str, name: str) -> TimmTower:
    try:
        with open(path) as f:
            cfg = json.load(f)
        if "pretrained_cfg" not in cfg:  # timm's older single-dict layout
            cfg = dict(architecture=cfg.pop("architecture"), pretrained_cfg=cfg)
        arch, pretrained_cfg = cfg["architecture"], dict(cfg["pretrained_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"config key {KEY!r}: {path}: not a timm config.json (architecture, "
                              f"pretrained_cfg): {type(e).__name__}: {e}") from None
    _check_architecture(arch, f"{name} (architecture {arch})")
    return TimmTower(arch, dict(cfg.get("model_args") or {}), pretrained_cfg, os.path.dirname(path))


def _from_inline(d) -> TimmTower:
    from omegaconf import OmegaConf
    d = OmegaConf.to_container(d, resolve=True) if OmegaConf.is_config(d) else dict(d)
    if "architecture" not in d:
        raise ConfigError("config key 'timm_config_dict' needs 'architecture' (a timm model name)")
    _check_architecture(d["architecture"], d["architecture"])
    return TimmTower(d["architecture"], dict(d.get("model_args") or {}), dict(d.get("pretrained_cfg") or {}),
                     d.get("weights_repo"))


def check_keys(vit_type, name, inline) -> None:
    """The config's tower keys agree (config/check.py calls this for every merged config): a timm name is
    used with vit_type=timm only, and vit_type=timm has one."""
    if vit_type == "timm" and not name and inline is None:
        raise ConfigError(f"vit_type=timm needs config key {KEY!r}: a timm name (e.g. "
                          f"vit_base_patch16_clip_224.openai), a Hub repo in timm's layout or a local folder")
    if vit_type != "timm" and (name or inline is not None):
        which = KEY if name else "timm_config_dict"
        raise ConfigError(f"config key {which!r} is set but vit_type={vit_type!r}: set vit_type=timm to use "
                          f"a timm tower, or remove {which}")


def resolve(config) -> TimmTower:
    """The timm tower the config names (see the module doc); ``timm_model_args`` merged over the source's
    model args. A missing or unknown name is one :class:`ConfigError` line."""
    inline, name = config.get("timm_config_dict"), config.get(KEY)
    if inline is not None:
        tower = _from_inline(inline)
    else:
        name = str(name)
        local = name[len("local-dir:"):] if name.startswith("local-dir:") else name
        if os.path.isdir(local):
            if not os.path.isfile(os.path.join(local, "config.json")):
                raise CheckpointError(f"config key {KEY!r}: folder {local} has no config.json (timm's "
                                      f"layout: config.json + model.safetensors, as timm's save_for_hf "
                                      f"writes)")
            tower = _parse_config_json(os.path.join(local, "config.json"), name)
        elif name.startswith("hf-hub:") or "/" in name:
            repo = name[len("hf-hub:"):] if name.startswith("hf-hub:") else name
            path = _fetch(repo, "config.json", KEY)
            if path is None:
                raise CheckpointError(f"config key {KEY!r}: Hub repo {repo!r} has no config.json (not a timm "
                                      f"model repo)")
            tower = _parse_config_json(path, name)
            tower = TimmTower(tower.architecture, tower.model_args, tower.pretrained_cfg, repo)
        else:
            tower = _from_registry(name)
    extra = config.get("timm_model_args") or {}
    if extra:
        from omegaconf import OmegaConf
        extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra)
        tower = TimmTower(tower.architecture, {**tower.model_args, **extra}, tower.pretrained_cfg,
                          tower.weights_repo)
    return tower


def weights_file(tower: TimmTower) -> str:
    """The local path of the tower's pretrained weights: in its folder, or downloaded into the HF cache."""
    where = tower.weights_repo
    if not where:
        raise CheckpointError(f"config key {KEY!r}: timm model {tower.architecture} has no Hugging Face Hub "
                              f"weights (its pretrained_cfg names no hf_hub_id); pick a tagged name "
                              f"(timm.list_pretrained('{tower.architecture}*')) or set tower_init=random")
    if os.path.isdir(where):
        for f in WEIGHT_FILES:
            if os.path.isfile(os.path.join(where, f)):
                return os.path.join(where, f)
        raise CheckpointError(f"config key {KEY!r}: folder {where} has none of {', '.join(WEIGHT_FILES)}")
    filename = tower.pretrained_cfg.get("hf_hub_filename")
    for f in ([filename] if filename else []) + list(WEIGHT_FILES):
        path = _fetch(where, f, KEY)
        if path is not None:
            return path
    raise CheckpointError(f"config key {KEY!r}: Hub repo {where!r} has none of {', '.join(WEIGHT_FILES)} (or "
                          f"HF_HUB_OFFLINE is set and the cache lacks them); run once online, or set "
                          f"tower_init=random")
