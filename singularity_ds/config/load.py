"""One config path: packaged (or user) YAML files + command-line ``key=value`` overrides.

As the original: OmegaConf YAML with interpolation (``${available_corpus.webvid}``,
``${oc.env:SL_DATA_DIR}``), dotted CLI overrides (``video_input.num_frames=4 test_types=[val,test]``)
and the strings ``None``/``none`` read as null. Added here: ``defaults.yaml`` holds the keys every task
shares, and every override (preset files such as ``tiny`` and CLI keys) is checked against the keys
that exist: an unknown key or a value of the wrong type is one error naming the key and the closest
valid one.

``load_config(["ret_msrvtt", "tiny"], ["video_input.num_frames=4"])``: the first name is the task
config (a packaged name or a YAML path); later names are overlays; CLI keys come last.
"""
import difflib
import os
from importlib import resources
from typing import Iterable, List, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError

CONFIG_DIR = resources.files("singularity_ds") / "configs"
# Maps whose entries are user-defined (new keys allowed under them).
OPEN_KEYS = ("available_corpus", "test_file", "vit_zoo", "bert_config_dict", "beit_config_dict",
             "vit_config_dict")


# Keys that accept more than one type: resume = False | True | "auto" | a checkpoint tag.
UNION_TYPES = {"resume": (bool, str)}



def packaged_configs() -> List[str]:
    return sorted(p.name[:-5] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml") and p.name != "defaults.yaml")


def _load_yaml(name: str) -> DictConfig:
    path = name if name.endswith((".yaml", ".yml")) or os.sep in name else None
    if path is None:
        packaged = CONFIG_DIR / f"{name}.yaml"
        if not packaged.is_file():
            close = difflib.get_close_matches(name, packaged_configs(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; packaged: {', '.join(packaged_configs())}"
            raise ConfigError(f"unknown config {name!r}{hint}")
        return OmegaConf.create(packaged.read_text())
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return cfg


def _none_strings(node):
    """The original's ``convert_types``: 'None' / 'none' strings -> null (here at every depth)."""
    if isinstance(node, DictConfig):
        for k in list(node.keys()):
            v = node._get_node(k)
            if isinstance(v, (DictConfig, ListConfig)):
                _none_strings(v)
            elif not v._is_interpolation() and node[k] in ("None", "none"):
                node[k] = None
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            if isinstance(node._get_node(i), (DictConfig, ListConfig)):
                _none_strings(node[i])
    return node


def _flat_keys(cfg: DictConfig, prefix="") -> List[str]:
    keys = []
    for k in cfg.keys():
        full = f"{prefix}{k}"
        keys.append(full)
        node = cfg._get_node(k)
        if isinstance(node, DictConfig) and not node._is_interpolation():
            keys += _flat_keys(node, full + ".")
    return keys


def _type_name(v) -> str:
    return "null" if v is None else {dict: "mapping", list: "list", int: "integer", float: "number",
                                     str: "string", bool: "boolean"}.get(type(v), type(v).__name__)


def _compatible(old, new) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, float):
        return isinstance(new, (int, float))
    for t in (int, str, list, dict):
        if isinstance(old, t):
            return isinstance(new, t)
    return True


def _check(base: DictConfig, override: DictConfig, source: str, prefix=""):
    """Every key in ``override`` must exist in ``base`` (outside OPEN_KEYS) with a compatible type."""
    valid = None
    for k in override.keys():
        full = f"{prefix}{k}"
        if full.split(".")[0] in OPEN_KEYS and "." in full:
            continue
        if k not in base:
            valid = valid if valid is not None else _flat_keys(base, prefix)
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {full!r}{hint}")
        if full in OPEN_KEYS:
            continue
        b, o = base._get_node(k), override._get_node(k)
        if isinstance(o, DictConfig) and isinstance(b, DictConfig) and not b._is_interpolation():
            _check(b, o, source, full + ".")
            continue
        if b._is_interpolation() or o._is_interpolation():
            continue
        old = OmegaConf.to_container(b) if isinstance(b, (DictConfig, ListConfig)) else b._value()
        new = OmegaConf.to_container(o) if isinstance(o, (DictConfig, ListConfig)) else o._value()
        if full in UNION_TYPES and isinstance(new, UNION_TYPES[full]):
            continue
        if not _compatible(old, new):
            raise ConfigError(f"{source}: config key {full!r} expects {_type_name(old)} (default {old!r}), "
                              f"got {new!r} ({_type_name(new)})")


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command-line overrides must look like key=value, got {bad[0]!r}")
    try:
        return _none_strings(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None


def load_config(configs: Iterable[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge ``defaults.yaml``, the task config, overlays, then CLI overrides (validated)."""
    configs = list(configs)
    if not configs:
        raise ConfigError("no config given; packaged configs: " + ", ".join(packaged_configs()))
    cfg = _none_strings(OmegaConf.merge(_load_yaml("defaults"), _load_yaml(configs[0])))
    for name in configs[1:]:
        overlay = _none_strings(_load_yaml(name))
        _check(cfg, overlay, f"config {name}")
        cfg = OmegaConf.merge(cfg, overlay)
    cli = parse_overrides(overrides)
    _check(cfg, cli, "command line")
    cfg = OmegaConf.merge(cfg, cli)
    return cfg
