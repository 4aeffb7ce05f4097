"""Training engine on DeepSpeed: one train loop (:mod:`.trainer`) for every task object, DeepSpeed
config and precision (:mod:`.ds_config`), optimizer and schedule (:mod:`.optim`), run checkpoints
(:mod:`.checkpointing`) and ``bench train`` (:mod:`.benchmark`)."""
