"""``singularity-ds bench train TASK ... --original PATH``: this project's training step and the ORIGINAL
code's (:mod:`.original`, from the user's clone at PATH), timed in one process, step by step in turn.

Both get the same synthetic batch (``bench train``'s) and random towers. The original runs as its
``tasks/pretrain.py`` runs it without ``fp16`` (fp32, plain ``torch.optim.AdamW`` with its weight-decay
groups); ours runs through the DeepSpeed engine and ``precision`` of the config. The steps alternate
(ours first on even steps, the original first on odd ones), so a machine that slows down during the
run slows both: the ratio is what to read on a shared machine. Reported per model: samples/s (median
step), forward / backward / optimizer seconds, the process CPU seconds of a step, forward FLOPs counted
by ``FlopCounterMode`` (x3 for a training step) and the FLOP rate (no MFU: a GEMM peak measured on a
busy machine would be cached for later runs), and memory on Linux: the resident state between steps
(weights, optimizer state, and the gradients the original keeps) and the peak a step adds on top of
it, measured after the timed steps with freed memory returned to the system (``malloc_trim``).
"""
import ctypes
import statistics
import time

import torch

from .train_step import OursStep, timed_step

PARTS = ("forward", "backward", "optimizer", "step")


def _status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim():
    """Give freed heap memory back to the system, so that RSS counts live memory only (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _gib(kib):
    return None if kib is None else round(kib / 2 ** 20, 2)


def _rss_after_trim():
    _trim()
    return _status_kib("VmRSS")


def step_peak_gib(model, device):
    """Peak RSS one training step adds on top of the RSS before it (GiB), or None off Linux."""
    before = _rss_after_trim()
    if before is None or not _reset_peak():
        return None
    timed_step(model, device)
    peak = _status_kib("VmHWM")
    _trim()
    return _gib(peak - before)


def forward_flops(model) -> float:
    """FLOPs of one forward (matmuls, attention, convolutions), counted by PyTorch."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward()
    return counter.get_total_flops()


def _summary(times, cpu, micro, flops):
    med = {p: statistics.median(t[i] for t in times) for i, p in enumerate(PARTS)}
    return dict(samples_per_s=round(micro / med["step"], 3), **{f"{p}_s": round(med[p], 3) for p in PARTS},
                cpu_s_per_step=round(statistics.median(cpu), 2),
                train_gflop_per_sample=round(3 * flops / micro / 1e9, 1),
                achieved_gflops=round(3 * flops / med["step"] / 1e9, 1))


def run(argv, original: str, steps: int = 3, warmup: int = 1) -> dict:
    from .original import OriginalStep

    base = _rss_after_trim()
    ours = OursStep(argv)
    device, micro = ours.device, ours.micro
    if ours.task.name != "pretrain" or ours.world != 1 or device.type != "cpu":
        from ..errors import ConfigError
        raise ConfigError("bench train --original: the pretrain task in one CPU process (the original's "
                          "pretraining model; no launcher)")
    timed_step(ours, device)
    ours_state = _rss_after_trim()
    orig = OriginalStep(original, ours.config, ours.cpu_batch, device)
    timed_step(orig, device)
    orig_state = _rss_after_trim()
    models = dict(ours=ours, original=orig)
    times = {k: [] for k in models}
    cpu = {k: [] for k in models}
    from tqdm import tqdm
    bar = tqdm(range(max(0, warmup - 1) + steps), desc="bench train --original", unit="step pair")
    for i in bar:
        for name in (("ours", "original") if i % 2 == 0 else ("original", "ours")):
            c0 = time.process_time()
            t, _ = timed_step(models[name], device)
            if i >= max(0, warmup - 1):
                times[name].append(t)
                cpu[name].append(time.process_time() - c0)
            # each step as it ends: a long run on a busy machine still leaves its numbers if stopped
            bar.write(f"step {i} {name}: forward / backward / optimizer / step "
                      f"{' / '.join(f'{x:.2f}' for x in t)} s, CPU {time.process_time() - c0:.2f} s")
    peak = {name: step_peak_gib(m, device) for name, m in models.items()}
    state = dict(ours=_gib(None if base is None else ours_state - base),
                 original=_gib(None if base is None else orig_state - ours_state))
    flops = {name: forward_flops(m) for name, m in models.items()}
    res = dict(task="pretrain", precision=ours.precision, original_precision="fp32", batch=micro,
               frames=ours.config.video_input.num_frames, threads=torch.get_num_threads(), steps=steps,
               process_base_gib=_gib(base))
    for name in models:
        params = {id(p): p.numel() for p in models[name].parameters()}  # tied weights once
        res[name] = dict(_summary(times[name], cpu[name], micro, flops[name]),
                         parameters=sum(params.values()),
                         state_gib=state[name], step_peak_gib=peak[name],
                         peak_gib=(None if peak[name] is None or state[name] is None
                                   else round(res["process_base_gib"] + state[name] + peak[name], 2)))
    res["ratio_samples_per_s"] = round(res["ours"]["samples_per_s"] / res["original"]["samples_per_s"], 3)
    res["ratio_cpu_s"] = round(res["original"]["cpu_s_per_step"] / res["ours"]["cpu_s_per_step"], 3)
    return res


def table(res) -> str:
    rows = [("samples/s", "samples_per_s"), ("step s (median)", "step_s"), ("forward s", "forward_s"),
            ("backward s", "backward_s"), ("optimizer s", "optimizer_s"), ("CPU s / step", "cpu_s_per_step"),
            ("train GFLOP / sample", "train_gflop_per_sample"), ("GFLOP/s", "achieved_gflops"),
            ("state GiB", "state_gib"), ("step peak GiB", "step_peak_gib"),
            ("peak RSS GiB (alone)", "peak_gib")]
    head = (f"| {res['batch']} samples, {res['frames']} frame(s), {res['threads']} threads | ours "
            f"({res['precision']}) | original (fp32) |")
    lines = [head, "|---|---:|---:|"]
    lines += [f"| {label} | {res['ours'][k]} | {res['original'][k]} |" for label, k in rows]
    lines.append(f"| **ours / original** | **{res['ratio_samples_per_s']}x** samples/s | "
                 f"{res['ratio_cpu_s']}x by CPU time |")
    return "\n".join(lines)
