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
    if config.compile:
        engine.compile()  # nn.Module.compile in place (inductor): checkpoint keys unchanged
    return engine, scheduler
