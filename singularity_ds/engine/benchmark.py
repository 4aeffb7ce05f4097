"""``singularity-ds bench train TASK [OVERLAY ...] [key=value ...] [--steps M] [--warmup N]``.

Times M training steps (after N warm-up steps) of any config on one synthetic in-memory batch (data
loading excluded), through the same DeepSpeed engine, ds_config and precision as ``train``; under the
``deepspeed`` launcher every rank runs its own batch. Prints and returns (``--json``): samples/s per
device and in total, step time median and 10-90% spread, the forward / backward / optimizer split,
the analytic training FLOPs per sample (the task's, :mod:`singularity_ds.models.flops`), achieved
TFLOP/s, MFU against the device's measured matmul peak for the dtype (a large GEMM, measured once and
cached in ``~/.cache/singularity_ds/peak.json``), and peak memory (CUDA max allocated, or the process RSS).
Towers start random (no weights are read): speed does not depend on them.

``--original PATH``: the original code's step as well, from the user's clone, in turn with ours in one
process (:mod:`.side_by_side`).
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch

from .. import dist
from ..fileio import write_json
from .ds_config import COMPUTE_DTYPE
from .train_step import OursStep, sync as _sync, timed_step

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "singularity_ds", "peak.json")


def matmul_peak(device, dtype, n: int = None) -> float:
    """Measured TFLOP/s of an n x n x n product in ``dtype`` (the MFU denominator), cached per device."""
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu-{torch.get_num_threads()}threads")
    key = f"{name}/{dtype}"
    try:
        with open(CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        a @ b
        reps += 1
    _sync(device)
    peak = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e12
    cache[key] = peak
    write_json(cache, CACHE)
    return peak


def run(argv, steps=10, warmup=3) -> dict:
    ours = OursStep(argv)
    task, config, device, world, micro = ours.task, ours.config, ours.device, ours.world, ours.micro
    precision = ours.precision
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        t, loss = timed_step(ours, device)
        if i >= warmup:
            times.append(t)
    step = [t[3] for t in times]
    median = statistics.median(step)
    deciles = statistics.quantiles(step, n=10) if len(step) > 1 else [median] * 9
    flops = task.step_flops(config, micro)
    achieved = flops["train"] * micro / median / 1e12
    peak = matmul_peak(device, COMPUTE_DTYPE[precision])
    memory = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return dict(task=task.name, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                threads=torch.get_num_threads(), ranks=world, precision=precision, ds_config=config.ds_config,
                batch_per_rank=micro, frames=config.video_input.num_frames, image_res=config.image_res,
                vision_tower=(f"timm {ours.engine.module.vision_encoder.tower.architecture}"
                              if config.vit_type == "timm"
                              else config.vit_type),
                samples_per_s_per_device=round(micro / median, 3),
                samples_per_s=round(micro * world / median, 3), step_s_median=round(median, 4),
                step_s_p10_p90=[round(deciles[0], 4), round(deciles[-1], 4)],
                forward_s=round(statistics.median(t[0] for t in times), 4),
                backward_s=round(statistics.median(t[1] for t in times), 4),
                optimizer_s=round(statistics.median(t[2] for t in times), 4),
                train_gflop_per_sample=round(flops["train"] / 1e9, 2),
                gflop_per_sample_by_part={k: round(3 * v / 1e9, 2) for k, v in flops.items()
                                          if k not in ("forward", "train")},
                achieved_tflops_per_device=round(achieved, 3), peak_tflops=round(peak, 3),
                mfu=round(achieved / peak, 4), peak_memory_gib=round(memory, 2), loss=round(loss.item(), 4))


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="singularity-ds bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--original", metavar="PATH",
                   help="also time the ORIGINAL code's step from this clone of "
                        "github.com/jayleicn/singularity, in turn with ours in this process, and print both "
                        "side by side "
                        "(pretrain task, one CPU process; see docs/benchmarks.md)")
    args, rest = p.parse_known_args(argv)
    if args.original:
        from .side_by_side import run as side_by_side, table
        res = side_by_side(rest, args.original, args.steps, args.warmup)
        print(json.dumps(res, indent=1))
        print(table(res))
        if args.json:
            write_json(res, args.json)
        return 0
    res = run(rest, args.steps, args.warmup)
    dist.release_cpu_shm()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(res, indent=1))
        if args.json:
            write_json(res, args.json)
    return 0
