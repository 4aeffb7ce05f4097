"""One timed training step of this project's engine on a synthetic batch: what ``bench train`` times,
alone or beside the original's (:mod:`.side_by_side`)."""
import time

import torch

from .. import dist
from ..data import per_media
from .build import build_engine
from .ds_config import WEIGHT_DTYPE, build_ds_config, resolve_precision


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class OursStep:
    """One ``bench train`` step of this project: the DeepSpeed engine ``train`` builds, on one
    synthetic in-memory batch of the config's shapes."""

    def __init__(self, argv):
        from omegaconf import OmegaConf

        from .trainer import parse_train_args
        self.task, self.config = parse_train_args(list(argv) + ["tower_init=random", "pretrained_path=None"])
        config = self.config
        self.precision = resolve_precision(config)
        self.micro = per_media(config.batch_size, "video")  # synthetic video batches: no corpus is read
        ds_cfg = build_ds_config(config, self.micro, self.precision)
        info = dist.setup()
        self.device, self.world = info["device"], info["world"]
        self.dtype = WEIGHT_DTYPE[self.precision]
        torch.manual_seed(0)
        model = self.task.build_model(OmegaConf.merge(config, {"pretrained_path": None}))
        self.engine, _ = build_engine(model, config, ds_cfg, steps_per_epoch=100)
        self.cpu_batch = self.task.synthetic_batch(config, self.micro)
        self.batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.cpu_batch.items()}

    def parameters(self):
        return self.engine.module.parameters()

    def forward(self):
        return sum(self.task.losses(self.engine, self.batch, self.dtype, self.device).values())

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        self.engine.step()


def timed_step(model, device) -> tuple:
    """(forward, backward, optimizer, total) wall seconds of one step, and its loss."""
    sync(device)
    t0 = time.perf_counter()
    loss = model.forward()
    sync(device)
    t1 = time.perf_counter()
    model.backward(loss)
    sync(device)
    t2 = time.perf_counter()
    model.step()
    sync(device)
    t3 = time.perf_counter()
    return (t1 - t0, t2 - t1, t3 - t2, t3 - t0), loss
