"""What a task is to the train loop: the one object that knows its model, data, losses and evaluation.

The trainer (``engine.trainer``) and ``bench train`` call only these methods, so they never branch on
a task's name. A task holds no state of a run; every method takes the config it needs.
"""
from typing import Dict

import torch


class Task:
    name: str = ""
    default_config: str = ""          # the packaged config ``train NAME`` starts from
    evaluate_each_epoch: bool = False  # also evaluated once more after training if the last epoch was cut
    train_annotations: str = "caption"  # the annotation schema of train_file / test_file entries
    eval_annotations: str = "caption"   # (data.annotations.SCHEMAS)

    # ---------------------------------------------------------------- building
    def build_model(self, config) -> torch.nn.Module:
        raise NotImplementedError

    def tokenizer(self, config):
        from ..data import build_tokenizer
        return build_tokenizer(config.text_encoder)

    def train_loader(self, config, tokenizer, rank: int, world: int):
        """A ``MetaLoader``: ``(media_type, batch)`` per micro-step, the same media type on every rank."""
        raise NotImplementedError

    def micro_batch(self, config) -> int:
        """DeepSpeed's per-rank micro-batch: the largest batch among the media types trained on."""
        from ..data import corpus_specs, per_media
        return max(per_media(config.batch_size, m) for m in {s[2] for s in corpus_specs(config.train_file)})

    # ---------------------------------------------------------------- one micro-step
    def losses(self, model, batch: dict, dtype, device) -> Dict[str, torch.Tensor]:
        """The weighted loss terms of one batch (their sum is back-propagated)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- evaluation
    def check_evaluation_data(self, config):
        """Read and check the annotation files :meth:`evaluate` will read, so that a bad one stops a run
        before it trains rather than at its first evaluation (nothing, for a task not evaluated)."""

    def evaluate(self, model, config, tokenizer) -> dict:
        """Metrics per evaluation set, ``{set name: {...}}``; ``{}`` when the config names none."""
        return {}

    def eval_scalars(self, results: dict) -> Dict[str, float]:
        """The numbers of ``results`` worth a TensorBoard curve, as ``{"set/metric": value}``."""
        return {}

    # ---------------------------------------------------------------- benchmarking
    def synthetic_batch(self, config, batch_size: int) -> dict:
        """A batch of the shapes the config trains on (random pixels, full-length ids), for
        ``bench train``."""
        raise NotImplementedError

    def step_flops(self, config, batch_size: int) -> dict:
        """Analytic matmul FLOPs per sample of one training step (``train`` = forward + backward)."""
        raise NotImplementedError


def random_media(config, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random clips of the config's training shape: (batch, frames, 3, res, res)."""
    return torch.randn(batch_size, config.video_input.num_frames, 3, config.image_res, config.image_res,
                       generator=generator)


def random_ids(batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(1000, 29000, (batch_size, length), generator=generator)
