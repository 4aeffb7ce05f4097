"""``singularity-ds bench eval itm|itc``: evaluation cost, for the docs and issue notes (not a test).

- ``itm``: N texts x N videos, ``k_test``, the tiny model (random weights, features from random
  pixels) in two settings (``frames12``: 12 frames x 17 tokens, 1 fusion layer; ``few_tokens``: 4 frames x
  5 tokens, 2 fusion layers): seconds for stage 1 and stage 2, the original's per-query re-ranking vs the
  offloaded path (each (text, video) pair scored once; K/V once per video; the first fusion layer's
  text-only part once per text), the speed-up, and that both give the same scores and metrics.
- ``itc``: stage 1 alone on N x N random normalised D-dim features, both directions' top-k, blockwise:
  wall time and peak memory (RSS on CPU, max allocated on CUDA) beyond the features.
"""
import argparse
import json
import resource
import time

import torch

from .features import Features, TokenStore
from .metrics import itm_eval, topk_eval
from .retrieval import _dense, _offload


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# name -> (frames, image_res, fusion layers): the tiny model has 3 BERT layers, fusion_layer = 3 - fusion
ITM_SETTINGS = {
    "frames12": (12, 64, 1),   # 12 frames x 17 tokens (204 video tokens), 1 fusion layer
    "few_tokens": (4, 32, 2),  # 4 frames x 5 tokens (20 video tokens), 2 fusion layers
}


def bench_itm(n=1000, frames=12, k_test=128, txt_len=32, res=64, fusion_layers=1, seed=0,
              device=None) -> dict:
    from ..config import load_config
    from ..models import Singularity
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    cfg = load_config(["ret_msrvtt", "tiny"], [f"image_res={res}", f"fusion_layer={3 - fusion_layers}"])
    model = Singularity(cfg).eval().to(device)
    with torch.no_grad():
        videos, pooled = [], []
        for i in range(0, n, 50):
            tokens, p = model.encode_image(torch.randn(min(50, n - i), frames, 3, res, res, device=device))
            videos.append(tokens.unsqueeze(1))
            pooled.append(model.project_image(p))
        ids = torch.randint(1000, 30000, (n, txt_len), device=device)
        mask = torch.ones(n, txt_len, dtype=torch.long, device=device)
        mask[:, txt_len // 2:] = torch.rand(n, 1, device=device) > 0.5  # half the texts padded to half length
        text, text_pooled = model.encode_text(ids, mask)
        feats = Features(TokenStore([text], device), mask, model.project_text(text_pooled),
                         TokenStore([torch.cat(videos)], device), torch.cat(pooled))
        _sync(device)
        # wall and process CPU seconds: on a shared (loaded) machine the CPU-second ratio is the steadier one
        start, cpu = time.perf_counter(), time.process_time()
        i2t, t2i, _ = _dense(model, feats, k_test, "concat")
        _sync(device)
        plain, plain_cpu = time.perf_counter() - start, time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        itm, _, stats = _offload(model, feats, k_test, "concat", progress=False)
        _sync(device)
        offload, offload_cpu = time.perf_counter() - start, time.process_time() - cpu
        # the same scores: every pair the offloaded path scored, looked up in the dense matrices
        diff = max(float((i2t.gather(1, torch.from_numpy(itm["i2t"][0]))
                          - torch.from_numpy(itm["i2t"][1])).abs().max()),
                   float((t2i.gather(1, torch.from_numpy(itm["t2i"][0]))
                          - torch.from_numpy(itm["t2i"][1])).abs().max()))
        # text i describes video i. Comparable for k_test >= 10 only: below it the dense matrix ranks a
        # ground truth outside the top k among the -100 fillers, which R@5 / R@10 can count
        gt = {i: i for i in range(n)}
        same_metrics = (itm_eval(i2t.numpy(), t2i.numpy(), gt, gt)
                        == topk_eval(*itm["i2t"], *itm["t2i"], gt, gt))
        start = time.perf_counter()
        from ..models.losses import similarity
        similarity(feats.video_feat, feats.text_feat).topk(k_test, dim=1)
        _sync(device)
        stage1 = time.perf_counter() - start
    return dict(texts=n, videos=n, frames=frames, video_tokens=videos[0].shape[2], k_test=k_test,
                fusion_layers=fusion_layers, max_score_diff=float(f"{diff:.3g}"), same_metrics=same_metrics,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                threads=torch.get_num_threads(), stage1_s=round(stage1, 3), original_s=round(plain, 2),
                offload_s=round(offload, 2), speedup=round(plain / offload, 2),
                original_cpu_s=round(plain_cpu, 2), offload_cpu_s=round(offload_cpu, 2),
                cpu_speedup=round(plain_cpu / offload_cpu, 2), **stats)


def bench_itc(n=1_000_000, dim=256, k=128, block=None, device=None, dtype="bfloat16", seed=0) -> dict:
    from .retrieval import topk_blockwise
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    block = block or (16384 if device.type == "cuda" else 8192)  # a tile is block^2 fp32 scores
    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(seed)

    def features():
        x = torch.empty(n, dim, device=device, dtype=dt)
        for i in range(0, n, 1 << 18):  # normalised in chunks: no fp32 copy of the whole set
            chunk = torch.randn(min(1 << 18, n - i), dim, device=device, generator=g)
            x[i:i + chunk.shape[0]] = torch.nn.functional.normalize(chunk, dim=-1).to(dt)
        return x

    videos, texts = features(), features()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _peak_rss_mb()
    start = time.perf_counter()
    i2t = topk_blockwise(videos, texts, k, block)
    t2i = topk_blockwise(texts, videos, k, block)
    _sync(device)
    wall = time.perf_counter() - start
    out = dict(n=n, dim=dim, k=k, block=block, dtype=dtype, device=str(torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu"), threads=torch.get_num_threads(), wall_s=round(wall, 2),
               features_mb=round(2 * n * dim * videos.element_size() / 2 ** 20),
               results_mb=round(sum(t.numel() * t.element_size() for t in (*i2t, *t2i)) / 2 ** 20),
               peak_rss_mb=round(_peak_rss_mb()), rss_growth_mb=round(_peak_rss_mb() - rss0))
    if device.type == "cuda":
        out["gpu_peak_beyond_features_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
    return out


def main(argv) -> int:
    p = argparse.ArgumentParser(prog="singularity-ds bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["itm", "itc"])
    p.add_argument("--n", type=int, default=None, help="texts = videos (itm: 1000, itc: 1000000)")
    p.add_argument("--setting", choices=[*ITM_SETTINGS, "both"], default="both",
                   help="itm: " + "; ".join(f"{k}: {f} frames at {r} px, {fl} fusion layer(s)"
                                            for k, (f, r, fl) in ITM_SETTINGS.items()))
    p.add_argument("--frames", type=int, default=None, help="itm: override the setting's frame count")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--block", type=int, default=None, help="tile side (default 16384 on CUDA, 8192 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 on a shared machine makes CPU seconds count work")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "itm":
        names = list(ITM_SETTINGS) if args.setting == "both" else [args.setting]
        res = {}
        for name in names:  # one process, one after the other: their ratios are comparable
            frames, image_res, fusion = ITM_SETTINGS[name]
            res[name] = bench_itm(n=args.n or 1000, frames=args.frames or frames, res=image_res,
                                  fusion_layers=fusion, k_test=args.k, device=args.device)
    else:
        res = bench_itc(n=args.n or 1_000_000, dim=args.dim, k=args.k, block=args.block, device=args.device,
                        dtype=args.dtype)
    print(json.dumps(res, indent=1))
    if args.json:
        from ..fileio import write_json
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
