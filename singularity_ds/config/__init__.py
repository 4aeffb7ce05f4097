"""Configs: the original's YAML files and ``key=value`` overrides, checked against one schema."""
from .load import config_from_checkpoint, load_config, packaged_configs, parse_overrides

__all__ = ["config_from_checkpoint", "load_config", "packaged_configs", "parse_overrides"]
