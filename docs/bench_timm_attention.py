"""Attention inside a timm tower on this machine: timm's fused SDPA path, timm's explicit matmuls
(``fused_attn=False``, = ``attention_impl=math``) and the project's attention function
(``singularity_ds.models.attention.attention``, patched into timm's ``Attention.forward`` for this
measurement only), side by side in one process, rounds interleaved.

    python docs/bench_timm_attention.py [--batch 8] [--reps 3] [--model vit_base_patch16_clip_224]

Prints the median forward + backward seconds of the random tower at 224 px per mode and dtype
(docs/benchmarks.md, "timm towers").
"""
import argparse
import statistics
import time

import timm
import torch
from timm.models.vision_transformer import Attention

from singularity_ds.models.attention import attention, merge_heads

timm_forward = Attention.forward


def ours_forward(self, x, attn_mask=None, **_):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k = self.q_norm(q), self.k_norm(k)
    out = attention(q, k, v, attn_mask, self.attn_drop.p if self.training else 0.0, "sdpa")
    return self.proj_drop(self.proj(self.norm(merge_heads(out))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default="vit_base_patch16_clip_224")
    args = p.parse_args()
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        model = timm.create_model(args.model, num_classes=0).to(dtype).train()
        x = torch.randn(args.batch, 3, 224, 224, dtype=dtype)
        modes = {"timm fused (SDPA)": (timm_forward, True), "timm math": (timm_forward, False),
                 "ours (attention())": (ours_forward, True)}
        times = {m: [] for m in modes}
        for rep in range(args.reps + 1):  # round 0 warms up
            for mode, (forward, fused) in modes.items():
                Attention.forward = forward
                for m in model.modules():
                    if isinstance(m, Attention):
                        m.fused_attn = fused
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                model.forward_features(x).float().pow(2).mean().backward()
                if rep:
                    times[mode].append(time.perf_counter() - t0)
        Attention.forward = timm_forward
        for mode, ts in times.items():
            print(f"{str(dtype).split('.')[-1]:9s} {mode:20s} fwd+bwd {statistics.median(ts):.3f} s "
                  f"(batch {args.batch}, {args.model})")


if __name__ == "__main__":
    main()
