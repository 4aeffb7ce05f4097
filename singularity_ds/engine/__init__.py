"""Training engine on DeepSpeed: ``engine.trainer.train_main(argv)`` runs a task (pretrain, train_ret,
train_qa) in one loop. Nothing is imported here, so ``engine.dist`` stays importable from the
evaluation code without pulling in the trainer."""
