"""Configs: the original's YAML files and ``key=value`` overrides, checked against one schema."""
from .load import (
    complete_config,
    config_error_line,
    load_config,
    packaged_configs,
    parse_overrides,
    run_folder,
)

__all__ = ["complete_config", "config_error_line", "load_config", "packaged_configs", "parse_overrides",
           "run_folder"]
