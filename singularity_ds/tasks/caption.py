"""Caption tasks: pretraining (ITC + ITM + MLM on image and video corpora) and retrieval fine-tuning.

- ``pretrain``: image + video corpora mixed (MetaLoader); the second (temporal) stage is the same task
  with ``video_input.num_frames=4 temporal_vision_encoder.enable=True ...``; not evaluated during
  training (evaluate the export with ``singularity-ds eval ret``).
- ``train_ret``: ITC + ITM, retrieval evaluation (``test_file``/``test_types``) at every epoch end.
"""
import torch

from ..data import caption_train_loader, eval_datasets, per_media
from ..eval.run import evaluate_sets
from ..models import Singularity, build_model
from ..models.flops import step_flops
from .base import Task, random_ids, random_media


class CaptionTask(Task):
    def build_model(self, config):
        return build_model(config, Singularity)

    def train_loader(self, config, tokenizer, rank, world):
        return caption_train_loader(config, tokenizer, rank, world)

    def losses(self, model, batch, dtype, device):
        return model(batch["media"].to(device, dtype), batch["input_ids"].to(device),
                     batch["attention_mask"].to(device), batch["idx"].to(device))

    def check_evaluation_data(self, config):
        if self.evaluate_each_epoch and config.test_file:
            eval_datasets(config)

    @torch.no_grad()
    def evaluate(self, model, config, tokenizer):
        """Retrieval metrics per test set: ``{name: {"itm": ITM re-ranked, "itc": ITC only, counts and the
        skipped broken media}}`` (:func:`~singularity_ds.eval.run.evaluate_sets`)."""
        return evaluate_sets(model, config, tokenizer) if config.test_file else {}

    def eval_scalars(self, results):
        return {f"{name}/{k}": v for name, res in results.items() for k, v in res["itm"].items()
                if isinstance(v, (int, float))}

    def synthetic_batch(self, config, batch_size):
        g = torch.Generator().manual_seed(0)
        length = per_media(config.max_txt_l, "video")
        return dict(media=random_media(config, batch_size, g), input_ids=random_ids(batch_size, length, g),
                    attention_mask=torch.ones(batch_size, length, dtype=torch.long),
                    idx=torch.arange(batch_size))

    def step_flops(self, config, batch_size):
        return step_flops(config, batch_size)


class PretrainTask(CaptionTask):
    name, default_config, evaluate_each_epoch = "pretrain", "pretrain", False


class RetrievalTask(CaptionTask):
    name, default_config, evaluate_each_epoch = "train_ret", "ret_msrvtt", True
