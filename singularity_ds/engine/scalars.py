"""Where a run's scalars go: TensorBoard always, Weights & Biases with ``wandb.enable`` (the original's
keys). :class:`~.run_log.RunLog` hands every scalar to each sink through one call, so both get identical
tags, values and steps.

- TensorBoard: ``<run>/tb``; a resumed run purges the events past the step it resumes from.
- W&B: ``<run>/wandb`` (``wandb.init(dir=run)``); project / entity from the config, the whole config as
  the run's config. The run id is kept in ``<run>/wandb/run_id``, so a resumed run continues the same W&B
  run (W&B drops the replayed steps it already holds; they are bit-identical on CPU). ``WANDB_MODE=offline``
  writes the run files locally, to sync later (``wandb sync``).
"""
import os
import uuid

from ..errors import ConfigError
from ..fileio import atomic_write


class TensorBoardSink:
    def __init__(self, run_dir: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: TensorBoard drops the events of this folder at steps >= it (an earlier attempt's)
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=first_step + 1)

    def log(self, scalars: dict, step: int):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()


class WandbSink:
    def __init__(self, config, run_dir: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("config key 'wandb.enable' is True but the wandb package is not installed: "
                              "pip install 'singularity-ds[wandb]', or set wandb.enable=False") from None
        from ..models.weights import plain_config
        folder = os.path.join(run_dir, "wandb")
        os.makedirs(folder, exist_ok=True)
        id_file = os.path.join(folder, "run_id")
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # W&B run ids: 8 lower-case letters/digits
            atomic_write(id_file, run_id)
        try:
            self.run = wandb.init(project=config.wandb.project, entity=config.wandb.entity, dir=run_dir,
                                  id=run_id, resume="allow", name=os.path.basename(os.path.abspath(run_dir)),
                                  config=plain_config(config))
        except Exception as e:  # not logged in, no network, a bad entity: W&B's own errors, in one line
            raise ConfigError(f"config key 'wandb.enable': W&B could not start a run ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); log in "
                              f"(`wandb login` or WANDB_API_KEY), set WANDB_MODE=offline, or set "
                              f"wandb.enable=False") from None

    def log(self, scalars: dict, step: int):
        self.run.log(dict(scalars), step=step)

    def close(self):
        self.run.finish()


def open_sinks(config, run_dir: str, first_step: int) -> list:
    """The sinks of this run (rank 0): TensorBoard, and W&B when ``config.wandb.enable``."""
    sinks = [TensorBoardSink(run_dir, first_step)]
    if config is not None and config.wandb.enable:
        sinks.append(WandbSink(config, run_dir))
    return sinks
