"""Config values checked against the schema, each failure one line naming the key.

Two moments: ``check_layer`` when a file or the command line is read (unknown keys, with the closest
valid one; values of the wrong type, interpolations left for later), and ``validate`` on the merged
config (every key's resolved value: type, then range or choices). A value that cannot resolve yet
(an unset ``${oc.env:SL_DATA_DIR}``) is skipped: it fails where it is used, naming itself.
"""
import dataclasses
import difflib
import re
import typing
from typing import Any, List

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError
from ..timm_hub import check_keys
from .schema import CorpusSpec, Key, is_union, keys

_MISSING = object()


def value_type_name(v) -> str:
    return "null" if v is None else {dict: "mapping", list: "list", int: "integer", float: "number",
                                     str: "string", bool: "boolean"}.get(type(v), type(v).__name__)


def type_name(tp) -> str:
    """How messages and docs name a schema type: ``integer or {image, video}``, ``mapping of corpus``."""
    if tp is Any:
        return "any"
    if tp == CorpusSpec:
        return "corpus"
    if is_union(tp):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join("{" + ", ".join(f.name for f in dataclasses.fields(a)) + "}"
                           if dataclasses.is_dataclass(a) else type_name(a) for a in arms)
    if dataclasses.is_dataclass(tp):
        return "mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of {type_name(args[1])}"
    return {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}[tp]


def matches(value, tp) -> bool:
    """Whether a plain value fits a schema type. An interpolation (``${...}``) fits any type: it is
    checked once resolved. An integer fits a float; a boolean fits only a boolean."""
    if tp is Any or (isinstance(value, str) and "${" in value):
        return True
    if is_union(tp):
        return any(matches(value, arm) for arm in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return isinstance(value, dict)  # its keys are checked one by one (they are schema keys too)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return isinstance(value, list) and all(matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(v, args[1]) for v in value.values())
    if tp is type(None):
        return value is None
    if isinstance(value, bool) or tp is bool:
        return isinstance(value, bool) and tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


def _open_value_type(tp):
    """The value type of an open mapping (``test_file``: name -> corpus), else None."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)] if is_union(tp) else [tp]
    return typing.get_args(arms[0])[1] if len(arms) == 1 and typing.get_origin(arms[0]) is dict else None


def _check_type(source: str, spec: Key, value):
    """A type error names the entry of an open mapping (``test_file.val``), else the key and its default."""
    entry_type = _open_value_type(spec.type)
    if entry_type is not None and isinstance(value, dict):
        for name, v in value.items():
            if not matches(v, entry_type):
                raise ConfigError(f"{source}config key '{spec.path}.{name}' expects {type_name(entry_type)}, "
                                  f"got {v!r} ({value_type_name(v)})")
    if not matches(value, spec.type):
        raise ConfigError(f"{source}config key {spec.path!r} expects {type_name(spec.type)} "
                          f"(default {spec.default!r}), got {value!r} ({value_type_name(value)})")


def check_layer(layer: DictConfig, source: str, keep_unknown: bool = False, prefix: str = "") -> List[str]:
    """Every key of one YAML file / the command line must be a schema key of the right type. Keys under
    an open mapping (``available_corpus``, ``test_file``, ...) are free. With ``keep_unknown``, unknown
    keys are returned instead of refused (a checkpoint's stored config)."""
    schema, unknown = keys(), []
    for k in layer.keys():
        full = f"{prefix}{k}"
        spec = schema.get(full)
        if spec is None:
            if keep_unknown:
                unknown.append(full)
                continue
            valid = [p for p in schema if p.startswith(prefix)]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown config key {full!r}{hint}")
        node = layer._get_node(k)
        if node._is_interpolation():
            continue
        if spec.group is not None and isinstance(node, DictConfig) and not node._is_none():
            unknown += check_layer(node, source, keep_unknown, full + ".")
            continue
        value = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node._value()
        _check_type(f"{source}: ", spec, value)
    return unknown


def _bounds_error(spec: Key, value):
    if spec.ge is not None and spec.le is not None and not spec.ge <= value <= spec.le:
        return f"must be in [{spec.ge}, {spec.le}]"
    if spec.ge is not None and value < spec.ge:
        return f"must be >= {spec.ge}"
    if spec.gt is not None and value <= spec.gt:
        return f"must be > {spec.gt}"
    if spec.le is not None and value > spec.le:
        return f"must be <= {spec.le}"
    return None


def _check_value(spec: Key, value):
    _check_type("", spec, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        problem = _bounds_error(spec, value)
        if problem:
            raise ConfigError(f"config key {spec.path!r} {problem}, got {value!r}")
    if isinstance(value, list):  # a list of numbers: the bounds hold for each element
        for i, v in enumerate(value):
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            problem = _bounds_error(spec, v) if number else None
            if problem:
                raise ConfigError(f"config key {spec.path!r}: element {i} {problem}, got {v!r}")
    if isinstance(value, str) and (spec.choices or spec.pattern):
        if value not in (spec.choices or ()) and not (spec.pattern and re.fullmatch(spec.pattern[0], value)):
            shown = list(spec.choices or ()) + ([spec.pattern[1]] if spec.pattern else [])
            raise ConfigError(f"config key {spec.path!r} must be one of {', '.join(shown)}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Every schema key of a merged config, resolved: its type, then its range or choices. Keys the
    schema does not know (kept from a checkpoint) are not looked at."""
    mapping = {""}  # keys whose value is a mapping: their own keys are checked next
    for spec in keys().values():
        parent, _, name = spec.path.rpartition(".")
        if parent not in mapping:
            continue  # under a scalar (batch_size: 8), an unresolvable value or a wrong type already reported
        try:
            value = OmegaConf.select(cfg, spec.path, default=_MISSING, throw_on_resolution_failure=True)
            nested = spec.group is not None and isinstance(value, DictConfig) and not value._is_none()
            if OmegaConf.is_config(value) and not nested:
                value = OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. ${oc.env:SL_DATA_DIR} unset: reported where it is used
            continue
        if value is _MISSING:
            if spec.member:
                raise ConfigError(f"config key {parent!r}: given per media type, it needs both image and "
                                  f"video; {name} is missing")
            continue
        if nested:
            mapping.add(spec.path)
            continue
        _check_value(spec, value)
    check_keys(*(OmegaConf.select(cfg, k, default=None)
                 for k in ("vit_type", "timm_model", "timm_config_dict")))
