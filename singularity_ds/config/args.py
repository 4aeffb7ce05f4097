"""The one parser of run arguments: ``[CONFIG ...] [key=value ...] [--flag ...]``.

Every entry point that takes configs (``train``, ``eval``, ``summary``, ``bench train``) reads its
arguments through :func:`split_run_args`, so the launcher's ``--local_rank`` is dropped, config names
and ``key=value`` overrides are told apart, and flags are recognised the same way everywhere.
"""
import argparse
from typing import Dict, List, NamedTuple, Sequence

from ..errors import ConfigError

HELP_FLAGS = ("-h", "--help")


class RunUsage(NamedTuple):
    """What ``--help`` prints for a run-argument command: its shape and what each part is."""
    prog: str               # singularity-ds train
    shape: str              # TASK [--config BASE] [OVERLAY ...] [key=value ...]
    parts: Dict[str, str]   # positional part -> what it is (TASK: pretrain, train_ret or train_qa)
    description: str = ""


def run_help(usage: RunUsage, value_flags, bool_flags) -> str:
    """The help text, through argparse so it reads as every other sub-command's."""
    p = argparse.ArgumentParser(prog=usage.prog, usage=f"%(prog)s {usage.shape}",
                                description=usage.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(f"{k}: {v}" for k, v in usage.parts.items()) + "\n")
    for flag in value_flags:
        p.add_argument(flag, metavar=flag.lstrip("-").upper(), help=_doc(value_flags, flag))
    for flag in bool_flags:
        p.add_argument(flag, action="store_true", help=_doc(bool_flags, flag))
    return p.format_help()


def _doc(flags, flag) -> str:
    return flags.get(flag, "") if isinstance(flags, dict) else ""


class RunArgs(NamedTuple):
    configs: List[str]      # task config then overlays (names or YAML paths), in order
    overrides: List[str]    # key=value, in order
    flags: Dict[str, str]   # --name VALUE (or "" for a bare --name), for the flags the caller declared


def strip_launcher_args(argv: Sequence[str]) -> List[str]:
    """The ``deepspeed`` launcher appends ``--local_rank=N``; the rank comes from the environment."""
    return [a for a in argv if not a.startswith("--local_rank")]


def split_run_args(argv: Sequence[str], value_flags: Sequence[str] = (),
                   bool_flags: Sequence[str] = (), usage=None) -> RunArgs:
    """``pretrain tiny a.b=1 --config X --offload`` -> RunArgs(["pretrain", "tiny"], ["a.b=1"], {...}).

    ``value_flags`` take the next argument (``--config BASE``); ``bool_flags`` take none (either may be a
    dict flag -> help). Any other ``--`` argument is an error naming it. With ``usage`` (a RunUsage, or a
    function giving one: built only when asked), ``-h`` / ``--help`` anywhere prints the help and exits 0."""
    configs, overrides, flags = [], [], {}
    items = strip_launcher_args(argv)
    if usage is not None and any(a in HELP_FLAGS for a in items):
        print(run_help(usage() if callable(usage) else usage, value_flags, bool_flags), end="")
        raise SystemExit(0)
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
