"""``singularity-ds bench kernels``: the Triton attention kernel vs SDPA vs the math reference on the
shapes this model runs, forward and forward+backward, with the error against an fp64 reference.

FLOPs: forward 4*B*H*Lq*Lk*d (QK^T and PV); forward+backward 3.5x that (five more products of the same
size in backward, FlashAttention's convention). CPU numbers come from the Triton interpreter when
``TRITON_INTERPRET=1`` and are not performance numbers.
"""
import argparse
import time

import torch

# name: (B, H, Lq, Lk, d, bias kind)
SHAPES = {
    "beit_self_relpos": (32, 12, 197, 197, 64, "relpos"),
    "bert_self_padding": (128, 12, 32, 32, 64, "padding"),
    "fusion_cross_12f": (64, 12, 32, 12 * 197, 64, "none"),
    "fusion_cross_32f": (16, 12, 32, 32 * 197, 64, "none"),
    "temporal_4f": (32 * 197, 12, 4, 4, 64, "none"),
}
TINY = {name: (2, 2, min(lq, 20), min(lk, 40), 32, kind) for name, (b, h, lq, lk, d, kind) in SHAPES.items()}


def _inputs(shape, dtype, device):
    b, h, lq, lk, d, kind = shape
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True) for n in (lq, lk, lk))
    bias = None
    if kind == "relpos":
        bias = torch.randn(1, h, lq, lk, device=device, dtype=dtype, requires_grad=True)
    elif kind == "padding":
        mask = torch.ones(b, lk, device=device)
        mask[::2, lk // 2:] = 0
        bias = ((1 - mask)[:, None, None, :] * -10000.0).to(dtype)
    return q, k, v, bias


def _impls():
    import torch.nn.functional as F

    from .attention import flash_attention

    def sdpa(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def math_ref(q, k, v, bias):
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        return (s if bias is None else s + bias).softmax(-1) @ v

    return {"triton": flash_attention, "sdpa": sdpa, "math": math_ref}


def _time(fn, device, reps):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - t) / reps


def run(shapes, dtype, device, reps):
    rows = []
    for name, shape in shapes.items():
        b, h, lq, lk, d, _ = shape
        flops = 4 * b * h * lq * lk * d
        q, k, v, bias = _inputs(shape, dtype, device)
        with torch.no_grad():
            ref = _impls()["math"](q.double(), k.double(), v.double(),
                                   None if bias is None else bias.double())
        for impl, fn in _impls().items():
            try:
                with torch.no_grad():
                    err = (fn(q, k, v, bias).double() - ref).abs().max().item()
                    fwd = _time(lambda: fn(q, k, v, bias), device, reps)
                grad = torch.randn(b, h, lq, d, device=device, dtype=dtype)
                both = _time(lambda: fn(q, k, v, bias).backward(grad), device, reps)
            except torch.OutOfMemoryError:
                rows.append(dict(shape=name, impl=impl, error="out of memory"))
                torch.cuda.empty_cache()
                continue
            rows.append(dict(shape=name, impl=impl, B=b, H=h, Lq=lq, Lk=lk, d=d, max_abs_err=err,
                             fwd_ms=round(fwd, 3), fwd_tflops=round(flops / fwd / 1e9, 1),
                             fwd_bwd_ms=round(both, 3), fwd_bwd_tflops=round(3.5 * flops / both / 1e9, 1)))
    return rows


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="singularity-ds bench kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shapes = SHAPES if device.type == "cuda" else TINY  # the interpreter is ~1000x slower
    rows = run(shapes, dtype, device, args.reps or (20 if device.type == "cuda" else 2))
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"{hardware}, {dtype}")
    print(f"{'shape':<20s}{'impl':<8s}{'fwd ms':>10s}{'TFLOP/s':>9s}{'fwd+bwd ms':>12s}{'TFLOP/s':>9s}"
          f"{'max err':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<20s}{r['impl']:<8s}  {r['error']}")
            continue
        print(f"{r['shape']:<20s}{r['impl']:<8s}{r['fwd_ms']:>10.3f}{r['fwd_tflops']:>9.1f}{r['fwd_bwd_ms']:>12.3f}"
              f"{r['fwd_bwd_tflops']:>9.1f}{r['max_abs_err']:>10.1e}")
    if args.json:
        from ..fileio import write_json
        write_json(dict(hardware=hardware, dtype=str(dtype), rows=rows), args.json)
    return 0
