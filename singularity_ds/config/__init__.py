"""Configs: the original's YAML files and ``key=value`` overrides, checked against one schema."""
from .load import load_config, packaged_configs, parse_overrides

__all__ = ["load_config", "packaged_configs", "parse_overrides"]
