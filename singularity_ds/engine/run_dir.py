"""Whether ``output_dir`` may be used: a new run needs a folder that holds no run of its own.

A run that stopped before its first checkpoint (a typo in the data, a crash at start-up) leaves only
files a run writes as it starts; they must not block the corrected rerun, which reuses them (logs
appended, history and TensorBoard restarted). A folder with a checkpoint, results or anything a user
put there is refused unless ``resume`` or ``overwrite``; nothing in it is ever deleted here.
"""
import os

from ..config import run_folder
from ..errors import ConfigError
from .checkpointing import complete_tags

# what a run writes before its first checkpoint (checkpoints/ may hold the partial .tmp of a save)
START_FILES = frozenset({"config.yaml", "ds_config.json", "train.log", "tb", "wandb", "history.jsonl",
                         "checkpoints"})


def prepare_run_dir(config) -> str:
    """``output_dir`` must be new, or hold only a run's start-up files, unless ``resume`` or
    ``overwrite`` (checked before anything is written)."""
    run_dir = run_folder(config.output_dir, os.path.join("runs", config.task))
    if config.resume or config.overwrite or not os.path.isdir(run_dir):
        return run_dir
    others = sorted(n for n in os.listdir(run_dir) if n not in START_FILES and n != ".tmp")
    checkpoints = complete_tags(os.path.join(run_dir, "checkpoints"))
    if others or checkpoints:
        held = f"checkpoint {checkpoints[-1]}" if checkpoints else ", ".join(others[:3])
        raise ConfigError(f"output_dir {run_dir} exists and is not empty (it holds {held}); pass resume=auto "
                          f"to continue it or overwrite=True to replace it")
    return run_dir
