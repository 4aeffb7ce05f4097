"""Tasks plug into the one train loop: each builds its model and data, computes its losses, evaluates.

- ``pretrain``: image + video corpora mixed (MetaLoader), ITC + ITM + MLM; the second (temporal) stage
  is the same task with ``video_input.num_frames=4 temporal_vision_encoder.enable=True ...``.
- ``train_ret``: retrieval fine-tuning, ITC + ITM, evaluation at every epoch end and after training.
- ``train_qa``: question answering (answer decoder), weighted answer likelihood, answer-list ranking
  evaluated at every epoch end and after training.
"""
import logging

import torch

from ..data import build_tokenizer, caption_train_loader, corpus_specs, per_media, qa_train_loader
from ..eval.run import evaluate_qa_sets, evaluate_sets
from ..models import build_model

logger = logging.getLogger(__name__)


class CaptionTask:
    """Video/image-caption training (pretraining and retrieval fine-tuning share it)."""

    def __init__(self, name: str, default_config: str, evaluate_each_epoch: bool):
        self.name, self.default_config, self.evaluate_each_epoch = name, default_config, evaluate_each_epoch

    def build_model(self, config):
        return build_model(config)

    def tokenizer(self, config):
        return build_tokenizer(config.get("text_encoder", "bert-base-uncased"))

    def train_loader(self, config, tokenizer, rank, world):
        return caption_train_loader(config, tokenizer, rank, world)

    def micro_batch(self, config):
        """The largest per-rank batch among the media types actually trained on (DeepSpeed's micro-batch)."""
        return max(per_media(config.batch_size, m) for m in {s[2] for s in corpus_specs(config.train_file)})

    def losses(self, model, batch, dtype, device) -> dict:
        return model(batch["media"].to(device, dtype), batch["input_ids"].to(device),
                     batch["attention_mask"].to(device), batch["idx"].to(device))

    @torch.no_grad()
    def evaluate(self, model, config, tokenizer, names=None) -> dict:
        """Retrieval metrics per test set: {name: {"x": {...}, "emb": {...}}}."""
        if not config.get("test_file"):
            return {}
        return evaluate_sets(model, config, tokenizer, names)


class QATask(CaptionTask):
    """Video QA / VQA: the model is :class:`~singularity_ds.models.SingularityQA` (``config.task``)."""

    def train_loader(self, config, tokenizer, rank, world):
        return qa_train_loader(config, tokenizer, rank, world)

    def losses(self, model, batch, dtype, device) -> dict:
        return dict(loss_qa=model(batch["media"].to(device, dtype), batch["question_ids"].to(device),
                                  batch["question_mask"].to(device), batch["answer_ids"].to(device),
                                  batch["answer_mask"].to(device), batch["weights"].to(device), batch["num_answers"]))

    @torch.no_grad()
    def evaluate(self, model, config, tokenizer, names=None) -> dict:
        """{name: {"accuracy", "metric", "per_type", "missing_answers", "questions"}}."""
        if not config.get("test_file"):
            return {}
        return evaluate_qa_sets(model, config, tokenizer, names)


TASKS = {
    "pretrain": CaptionTask("pretrain", "pretrain", evaluate_each_epoch=False),
    "train_ret": CaptionTask("train_ret", "ret_msrvtt", evaluate_each_epoch=True),
    "train_qa": QATask("train_qa", "qa_msrvtt", evaluate_each_epoch=True),
}
