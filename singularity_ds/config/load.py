"""One config path: packaged (or user) YAML files + command-line ``key=value`` overrides.

As the original: OmegaConf YAML with interpolation (``${available_corpus.webvid}``,
``${oc.env:SL_DATA_DIR}``), dotted CLI overrides (``video_input.num_frames=4 test_types=[val,test]``)
and the strings ``None``/``none`` read as null. Added here: the keys, their defaults and accepted values
live in config/schema.py; the config starts from its defaults, every file (the task config, preset
overlays such as ``tiny``) and the CLI keys are checked against it (an unknown key names the closest
valid one; a wrong type names the expected one), and the merged values are checked against their
ranges and choices.

``load_config(["ret_msrvtt", "tiny"], ["video_input.num_frames=4"])``: the first name is the task
config (a packaged name or a YAML path); later names are overlays; CLI keys come last.
"""
import difflib
import logging
import os
import re
from importlib import resources
from typing import Iterable, List, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError
from .check import check_layer, validate
from .schema import defaults

CONFIG_DIR = resources.files("singularity_ds") / "configs"
logger = logging.getLogger(__name__)


def packaged_configs() -> List[str]:
    return sorted(p.name[:-5] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml"))


def _load_yaml(name: str) -> DictConfig:
    path = name if name.endswith((".yaml", ".yml")) or os.sep in name else None
    if path is None:
        packaged = CONFIG_DIR / f"{name}.yaml"
        if not packaged.is_file():
            close = difflib.get_close_matches(name, packaged_configs(), n=1)
            hint = (f"; did you mean {close[0]!r}?" if close
                    else f"; packaged: {', '.join(packaged_configs())}")
            raise ConfigError(f"unknown config {name!r}{hint}")
        return OmegaConf.create(packaged.read_text())
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"config file {path}: invalid YAML{_yaml_error(path, e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return cfg


def _at(mark) -> str:
    return f"line {mark.line + 1} column {mark.column + 1}"


def _yaml_error(path: str, error: Exception) -> str:
    """``error`` (from loading the YAML file ``path``) as ``" at line L column C: what"``, on one line.

    PyYAML's errors are several lines with the position in the middle; a bad byte gives a byte offset;
    OmegaConf's interpolation grammar errors give the key only, so its value is found in the file."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        where, context = _at(error.problem_mark), ""
        if error.context and error.context_mark is not None and _at(error.context_mark) != where:
            context = f" ({error.context} at {_at(error.context_mark)})"
        return f" at {where}: {error.problem}{context}"
    if isinstance(error, UnicodeDecodeError):
        with open(path, "rb") as f:
            before = f.read(error.start)
        line, column = before.count(b"\n") + 1, error.start - before.rfind(b"\n")
        return f" at line {line} column {column}: not UTF-8 ({error.reason})"
    key = getattr(error, "full_key", None)
    if isinstance(error, OmegaConfBaseException) and key:
        message = str(getattr(error, "msg", None) or error).strip().splitlines()[0]
        where = _key_position(path, key)
        return f" at {where}: key {key}: {message}" if where else f": key {key}: {message}"
    return f": {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"


def _key_position(path: str, full_key: str):
    """``line L column C`` of the value of a dotted key (``a.b``, ``a[0]``) in a YAML file, or None."""
    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    for part in filter(None, str(full_key).replace("[", ".").replace("]", "").split(".")):
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            return None
        if node is None:
            return None
    return _at(node.start_mark)


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


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command-line overrides must look like key=value, got {bad[0]!r}")
    try:
        return _none_strings(OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None


def load_config(configs: Iterable[str], overrides: Sequence[str] = ()) -> DictConfig:
    """The schema's defaults, then the task config, overlays and CLI overrides, each checked against the
    schema; the merged result validated (ranges, choices). Holds every schema key; keeps interpolation."""
    configs = list(configs)
    if not configs:
        raise ConfigError("no config given; packaged configs: " + ", ".join(packaged_configs()))
    cfg = OmegaConf.create(defaults())
    for name in configs:
        layer = _none_strings(_load_yaml(name))
        check_layer(layer, f"config {name}")
        cfg = OmegaConf.merge(cfg, layer)
    cli = parse_overrides(overrides)
    check_layer(cli, "command line")
    cfg = OmegaConf.merge(cfg, cli)
    validate(cfg)
    return cfg


def complete_config(stored) -> DictConfig:
    """Any config as a full one: the schema's defaults under the given values, checked and validated
    like a YAML file. For a checkpoint's stored config (an original ``.pth``'s, or an export folder's
    config.json) and for models built from a partial mapping; a config from :func:`load_config` comes
    back with the same values (a copy; interpolations kept).

    Keys the schema does not know are kept as stored (logged at debug level): the original stores its
    run's record (``rank``, ``world_size``, ``gpu``, ``dist_backend``, ...) and a newer singularity-ds may
    add keys; keeping them lets an export of the model write back everything it was given, and nothing
    reads them (the code reads schema keys only)."""
    if isinstance(stored, DictConfig):  # copied as is: its ${...} may only resolve later (or never)
        layer = _none_strings(OmegaConf.create(stored))
    else:
        layer = _none_strings(OmegaConf.create(dict(stored or {})))
    unknown = check_layer(layer, "checkpoint config", keep_unknown=True)
    if unknown:
        logger.debug("checkpoint config: keys unknown to the schema, kept as stored: %s", ", ".join(unknown))
    cfg = OmegaConf.merge(OmegaConf.create(defaults()), layer)
    validate(cfg)
    return cfg


# the original's environment variables, and what each holds
ENV_VARS = {"SL_DATA_DIR": "the data folder: anno_pretrain/, anno_downstream/ and videos_images/, as the "
                           "original's README sets it",
            "SL_EXP_DIR": "the folder of checkpoints and run folders, as the original's README sets it"}


def config_error_line(e, key: str = None) -> str:
    """An OmegaConf error as one line; an unset ``${oc.env:VAR}`` names the key, the variable and the fix."""
    text = str(e)
    env = re.search(r"Environment variable '([^']+)' not found", text)
    key = key or getattr(e, "full_key", None)
    if env:
        var = env.group(1)
        return (f"config key {key!r} reads the environment variable {var}, which is not set: export "
                f"{var}=/path ({ENV_VARS.get(var, 'see the config that reads it')}), or give the paths in "
                f"an overlay (make-synthetic writes one: OUT/configs/pretrain.yaml)")
    lines = [line.strip() for line in text.splitlines() if not line.strip().startswith("object_type")]
    return f"config: {'; '.join(lines)}"


def run_folder(output_dir, default: str) -> str:
    """A run's folder: ``output_dir`` (else ``default``), under ``$SL_EXP_DIR`` when that is set and the
    path is relative, as the original's scripts put every run under it."""
    path = output_dir or default
    exp = os.environ.get("SL_EXP_DIR")
    return os.path.abspath(os.path.join(exp, path)) if exp and not os.path.isabs(path) else path
