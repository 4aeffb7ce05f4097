"""The one parser of run arguments: ``[CONFIG ...] [key=value ...] [--flag ...]``.

Every entry point that takes configs (``train``, ``eval``, ``summary``, ``bench train``) reads its
arguments through :func:`split_run_args`, so the launcher's ``--local_rank`` is dropped, config names
and ``key=value`` overrides are told apart, and flags are recognised the same way everywhere.
"""
import argparse
from typing import Dict, List, NamedTuple, Sequence

from ..errors import ConfigError


class RunArgs(NamedTuple):
    configs: List[str]      # task config then overlays (names or YAML paths), in order
    overrides: List[str]    # key=value, in order
    flags: Dict[str, str]   # --name VALUE (or "" for a bare --name), for the flags the caller declared


def strip_launcher_args(argv: Sequence[str]) -> List[str]:
    """The ``deepspeed`` launcher appends ``--local_rank=N``; the rank comes from the environment."""
    return [a for a in argv if not a.startswith("--local_rank")]


def split_run_args(argv: Sequence[str], value_flags: Sequence[str] = (),
                   bool_flags: Sequence[str] = ()) -> RunArgs:
    """``pretrain tiny a.b=1 --config X --offload`` -> RunArgs(["pretrain", "tiny"], ["a.b=1"], {...}).

    ``value_flags`` take the next argument (``--config BASE``); ``bool_flags`` take none. Any other
    ``--`` argument is an error naming it."""
    configs, overrides, flags = [], [], {}
    items = strip_launcher_args(argv)
    i = 0
    while i < len(items):
        a = items[i]
        if a in value_flags:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError(f"{a} needs a value")
            flags[a.lstrip("-")] = items[i + 1]
            i += 2
            continue
        if a in bool_flags:
            flags[a.lstrip("-")] = ""
        elif a.startswith("--"):
            known = ", ".join(list(value_flags) + list(bool_flags)) or "none"
            raise ConfigError(f"unknown option {a!r} (options here: {known})")
        elif "=" in a:
            overrides.append(a)
        else:
            configs.append(a)
        i += 1
    return RunArgs(configs, overrides, flags)


def positive(cast):
    """An argparse ``type`` for numbers that must be > 0 (``positive(int)``, ``positive(Fraction)``)."""
    def parse(text):
        try:
            value = cast(text)
        except (ValueError, ZeroDivisionError):
            raise argparse.ArgumentTypeError(f"not a number: {text}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse
