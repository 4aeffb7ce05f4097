"""The original's optimiser and schedule: AdamW with weight decay on every parameter except biases and
1-D tensors (LayerNorm weights, layer-scale); a higher lr for named modules (``different_lr``); cosine
decay with linear warmup and a ``min_lr_multi`` floor, stepped every optimizer step."""
import logging
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)


def param_groups(model, opt_cfg) -> list:
    diff = opt_cfg.different_lr
    diff_names = list(diff.module_names) if diff.enable else []
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if (p.ndim == 1 or name.endswith(".bias")) else float(opt_cfg.weight_decay)
        lr = float(diff.lr) if any(n in name for n in diff_names) else float(opt_cfg.lr)
        groups.setdefault((wd, lr), []).append(p)
    for (wd, lr), ps in groups.items():
        logger.info("optimizer group: lr=%g weight_decay=%g params=%d", lr, wd, len(ps))
    return [dict(params=ps, weight_decay=wd, lr=lr) for (wd, lr), ps in groups.items()]


def build_optimizer(model, opt_cfg, cpu_adam: bool = False):
    if opt_cfg.opt.lower() != "adamw":
        raise ValueError(f"config key 'optimizer.opt': only adamW is supported, got {opt_cfg.opt!r}")
    groups = param_groups(model, opt_cfg)
    betas = tuple(opt_cfg.opt_betas)
    if cpu_adam:  # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's vectorised Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        logger.info("building DeepSpeed's CPU Adam (JIT-compiled on first use: about a minute)")
        return DeepSpeedCPUAdam(groups, lr=float(opt_cfg.lr), betas=betas, adamw_mode=True)
    # fused: one kernel over all parameters (CPU and CUDA); the same update as the loop version
    return torch.optim.AdamW(groups, lr=float(opt_cfg.lr), betas=betas, fused=True)


def cosine_lambda(warmup_steps: int, total_steps: int, min_lr_multi: float = 0.0):
    def factor(step):
        if step < warmup_steps:
            return max(min_lr_multi, step / max(1, warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(min_lr_multi, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


def build_scheduler(optimizer, sched_cfg, steps_per_epoch: int):
    if sched_cfg.sched != "cosine":
        raise ValueError(f"config key 'scheduler.sched': only cosine is supported, got {sched_cfg.sched!r}")
    total = int(sched_cfg.epochs * steps_per_epoch)
    warmup = int(float(sched_cfg.warmup_epochs) * steps_per_epoch)
    return LambdaLR(optimizer, cosine_lambda(warmup, total, float(sched_cfg.min_lr_multi)))
