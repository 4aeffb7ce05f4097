"""`singularity-ds train` with a NaN loss injected on purpose (tests/test_faults.py).

    nan_worker.py OUT NAN_RANK NAN_CALLS TRAIN_ARGS...    (alone, or under `deepspeed --num_accelerators 2`)

The task's losses are patched: on rank NAN_RANK, the micro-steps numbered in NAN_CALLS (comma-separated,
from 1) get a NaN ITM loss (through the graph, as a real one would). Each rank writes OUT.<rank>.json:
a digest of the model's weights as every micro-step starts, so a test can tell which steps changed them.
"""
import hashlib
import json
import os
import sys

import torch

from singularity_ds.tasks.caption import CaptionTask


def weights_digest(engine) -> str:
    flat = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
    return hashlib.sha1(flat.numpy().tobytes()).hexdigest()


def inject_nan(nan_calls, digests: list):
    """Patch CaptionTask.losses: NaN ITM loss at the micro-steps (1-based) in ``nan_calls``; the weights'
    digest as each micro-step starts is appended to ``digests``. Returns the original, to put back."""
    original = CaptionTask.losses

    def losses(self, model, batch, dtype, device):
        digests.append(weights_digest(model))
        out = original(self, model, batch, dtype, device)
        if len(digests) in nan_calls:
            out["loss_itm"] = out["loss_itm"] * float("nan")
        return out
    CaptionTask.losses = losses
    return original


if __name__ == "__main__":
    from singularity_ds.cli import main
    from singularity_ds.config.args import strip_launcher_args

    argv = strip_launcher_args(sys.argv[1:])
    out, nan_rank, calls, train_args = argv[0], int(argv[1]), {int(c) for c in argv[2].split(",")}, argv[3:]
    rank, digests = int(os.environ.get("RANK", "0")), []
    inject_nan(calls if rank == nan_rank else set(), digests)
    code = main(["train", *train_args])
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump(digests, f)
    sys.exit(code)
