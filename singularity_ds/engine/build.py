"""The DeepSpeed engine of a model, built one way for ``train`` and ``bench train``."""
from .ds_config import offloads_optimizer
from .optim import build_optimizer, build_scheduler


def build_engine(model, config, ds_cfg: dict, steps_per_epoch: int):
    """``(engine, scheduler)``: AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded), the
    config's schedule over ``steps_per_epoch`` optimizer steps, and ``compile=True`` applied in place."""
    import deepspeed

    optimizer = build_optimizer(model, config.optimizer, cpu_adam=offloads_optimizer(ds_cfg))
    scheduler = build_scheduler(optimizer, config.scheduler, steps_per_epoch)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_cfg)
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        # One data-parallel rank: ZeRO-0's "all-reduce" of the gradients is a flatten of every gradient
        # into a fresh buffer, a multiplication by 1, a one-rank all-reduce and a copy back (three passes
        # over all parameters, ~0.3 s of a base fp32 CPU step) that leaves every gradient as it was.
        engine.enable_backward_allreduce = False
    if config.compile:
        engine.compile()  # nn.Module.compile in place (inductor): checkpoint keys unchanged
    return engine, scheduler
