"""``train_qa``: video QA / VQA with the answer decoder (:class:`~singularity_ds.models.SingularityQA`):
weighted answer likelihood in training, answer-list ranking evaluated at every epoch end."""
import torch

from ..data import eval_datasets, qa_train_loader
from ..eval.run import evaluate_qa_sets, load_answer_list
from ..models import SingularityQA, build_model
from ..models.flops import qa_step_flops
from .base import Task, random_ids, random_media


class QATask(Task):
    name, default_config, evaluate_each_epoch = "train_qa", "qa_msrvtt", True
    train_annotations, eval_annotations = "qa_train", "qa_eval"

    def build_model(self, config):
        return build_model(config, SingularityQA)

    def train_loader(self, config, tokenizer, rank, world):
        return qa_train_loader(config, tokenizer, rank, world)

    def losses(self, model, batch, dtype, device):
        return dict(loss_qa=model(batch["media"].to(device, dtype), batch["question_ids"].to(device),
                                  batch["question_mask"].to(device), batch["answer_ids"].to(device),
                                  batch["answer_mask"].to(device), batch["weights"].to(device),
                                  batch["num_answers"]))

    def check_evaluation_data(self, config):
        if config.test_file:
            eval_datasets(config, kind="qa")
            load_answer_list(config)

    @torch.no_grad()
    def evaluate(self, model, config, tokenizer):
        """``{name: {"accuracy", "metric", "per_type", "missing_answers", "questions", "skipped_questions",
        "skipped_media"}}``."""
        return evaluate_qa_sets(model, config, tokenizer) if config.test_file else {}

    def eval_scalars(self, results):
        return {f"{name}/{k}": v for name, res in results.items() for k, v in res.items()
                if isinstance(v, (int, float))}

    def synthetic_batch(self, config, batch_size):
        """One answer of ``max_a_len`` tokens per question."""
        g = torch.Generator().manual_seed(0)
        q, a = config.max_q_len, config.max_a_len
        return dict(media=random_media(config, batch_size, g),
                    question_ids=random_ids(batch_size, q, g),
                    question_mask=torch.ones(batch_size, q, dtype=torch.long),
                    answer_ids=random_ids(batch_size, a, g),
                    answer_mask=torch.ones(batch_size, a, dtype=torch.long), weights=torch.ones(batch_size),
                    num_answers=[1] * batch_size)

    def step_flops(self, config, batch_size):
        return qa_step_flops(config)
