"""Training engine on DeepSpeed: ``train_main(argv)`` runs a task (pretrain, train_ret) in one loop."""
from .trainer import Trainer, parse_train_args, train_main

__all__ = ["Trainer", "parse_train_args", "train_main"]
