"""Run under `deepspeed --num_accelerators 2`: engine checks on a fixed batch, results to a JSON file.

    ds_worker.py zero OUT.json              each ds_config trains 3 steps on the same fixed batch
    ds_worker.py accumulation OUT.json      2 x micro-batch B vs 1 x 2B (per-sample loss, fp32)
    ds_worker.py amp OUT.json               precision=amp_bf16 under ZeRO-0 and ZeRO-2: dtypes and losses
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import tiny_config  # noqa: E402
from singularity_ds import dist  # noqa: E402
from singularity_ds.engine.ds_config import build_ds_config, offloads_optimizer  # noqa: E402
from singularity_ds.engine.optim import build_optimizer  # noqa: E402
from singularity_ds.models import Singularity  # noqa: E402


def batch(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, 10), generator=g)
    ids[:, 0] = 101
    return torch.randn(b,
                       1, 3, 32, 32, generator=g), ids, torch.ones(b, 10, dtype=torch.long), torch.arange(b)


def engine(cfg, micro, precision):
    import deepspeed
    torch.manual_seed(0)
    model = Singularity(cfg)
    ds = build_ds_config(cfg, micro, precision)
    opt = build_optimizer(model, cfg.optimizer, cpu_adam=offloads_optimizer(ds))
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    return eng


def zero_stages(out):
    info = dist.setup()
    results = {}
    video, ids, mask, idx = batch(8, seed=info["rank"])
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        cfg = tiny_config(ds_config=name, image_res=32, **{"optimizer.lr": 1e-3})
        eng = engine(cfg, 8, os.environ.get("PRECISION", "bf16"))
        losses = []
        for step in range(3):
            torch.manual_seed(1234 + info["rank"])  # the same objective every step
            loss = sum(eng(video.to(next(eng.module.parameters()).dtype), ids, mask, idx).values())
            eng.backward(loss)
            eng.step()
            losses.append(loss.item())
        results[name] = losses
        eng.destroy()
    if info["rank"] == 0:
        json.dump(results, open(out, "w"))


def amp(out):
    """fp32 weights, bf16 matmuls inside the engine's forward, a falling loss."""
    info = dist.setup()
    results = {}
    video, ids, mask, idx = batch(8, seed=info["rank"])
    for name in ("zero0", "zero2"):
        cfg = tiny_config(ds_config=name, image_res=32, **{"optimizer.lr": 1e-3})
        eng = engine(cfg, 8, "amp_bf16")
        seen = set()
        linear = eng.module.text_encoder.bert.encoder.layer[0].intermediate.dense
        linear.register_forward_hook(lambda m, i, o: seen.add(str(o.dtype)))
        losses = []
        for step in range(3):
            torch.manual_seed(1234 + info["rank"])
            loss = sum(eng(video, ids, mask, idx).values())
            eng.backward(loss)
            eng.step()
            losses.append(loss.item())
        results[name] = dict(losses=losses, linear_out=sorted(seen),
                             weights=sorted({str(p.dtype) for p in eng.module.parameters()}),
                             autocast=eng.torch_autocast_enabled())
        eng.destroy()
    if info["rank"] == 0:
        json.dump(results, open(out, "w"))


def accumulation(out):
    """Per-sample objective (MLM with fixed masks, no dropout), fp32: accumulation must be exact."""
    info = dist.setup()
    video, ids, mask, idx = batch(8, seed=info["rank"])
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    mlm_ids[:, 3], labels[:, 3] = 103, ids[:, 3]  # one masked token per caption
    cfg = tiny_config(ds_config="zero2", image_res=32, **{"loss_weight.itc": 0, "loss_weight.itm": 0,
                                                         "optimizer.lr": 1e-3})
    params = {}
    for gas, micro in ((1, 8), (2, 4)):
        cfg.gradient_accumulation_steps = gas
        eng = engine(cfg, micro, "fp32")
        eng.module.eval()  # no dropout: the same function of the batch however it is split
        for k in range(gas):
            sl = slice(k * micro, (k + 1) * micro)
            torch.manual_seed(0)
            loss = eng.module.get_mlm_loss(ids[sl], mask[sl], eng.module.encode_image(video[sl])[0],
                                           (mlm_ids[sl], labels[sl]))
            eng.backward(loss)
            eng.step()
        params[gas] = {n: p.detach().clone() for n, p in eng.module.named_parameters()}
        eng.destroy()
    diff = max((params[1][n] - params[2][n]).abs().max().item() for n in params[1])
    if info["rank"] == 0:
        json.dump({"max_param_diff": diff}, open(out, "w"))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    {"zero": zero_stages, "accumulation": accumulation, "amp": amp}[args[0]](args[1])
