"""DeepSpeed config: a JSON from ``ds_configs/`` (ZeRO stage, offload) whose task-dependent values are
filled from the YAML config, so the two never disagree. A JSON that sets one of those values
differently is refused with both values named."""
import json
import os
from pathlib import Path

import torch

from ..config.schema import PRECISIONS
from ..errors import ConfigError

# singularity_ds/ds_configs (the repo's top-level ds_configs/ links to it)
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def load_ds_config(name: str) -> dict:
    path = Path(name) if (os.sep in name or name.endswith(".json")) else DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"config key 'ds_config': {name!r} is not a file or one of {names}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path}: invalid JSON: {e}") from None


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# weight (and input) dtype, and the dtype the matmuls run in (the MFU denominator)
WEIGHT_DTYPE = {"bf16": torch.bfloat16, "amp_bf16": torch.float32,
                "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPE = dict(WEIGHT_DTYPE, amp_bf16=torch.bfloat16)


def resolve_precision(config) -> str:
    """``precision: auto`` -> bf16 where the device computes it natively, else fp32 (fp16 only on
    request or when the original's ``fp16: True`` runs on a GPU without bf16).

    ``bf16``: DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the optimizer). ``amp_bf16``:
    fp32 weights and optimizer, matmuls in bf16 under ``torch.autocast`` (DeepSpeed's ``torch_autocast``);
    its optimizer step skips the master-copy round trip (faster on GPUs, docs/benchmarks.md)."""
    p = config.precision
    if p not in PRECISIONS:
        raise ConfigError(f"config key 'precision': expected one of {', '.join(PRECISIONS)}, got {p!r}")
    if p != "auto":
        if p == "fp16" and not torch.cuda.is_available():
            raise ConfigError("config key 'precision': fp16 needs a GPU (DeepSpeed's fp16 path has no CPU "
                              "kernels); use bf16")
        return p
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if config.fp16 else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def build_ds_config(config, micro_batch: int, precision: str) -> dict:
    ds = load_ds_config(config.ds_config)
    clip = float(config.optimizer.max_grad_norm)
    filled = {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": clip if clip > 0 else 0.0,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
    }
    if precision == "amp_bf16":
        filled["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    for key, value in filled.items():
        if key in ds and ds[key] != value and not (isinstance(value, dict)
                                                   and ds[key].get("enabled") == value["enabled"]):
            raise ConfigError(f"ds_config sets {key}={ds[key]!r} but the YAML config gives {value!r}; "
                              f"remove it from the JSON (it is filled from the YAML config)")
    for bad in ("optimizer", "scheduler", "train_batch_size"):
        if bad in ds:
            raise ConfigError(f"ds_config sets {bad!r}; it comes from the YAML config (optimizer, scheduler, "
                              f"batch_size x gradient_accumulation_steps x ranks)")
    for key, value in filled.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = dict(ds[key], **value)
        else:
            ds[key] = value
    return ds


def offloads_optimizer(ds: dict) -> bool:
    zero = ds.get("zero_optimization", {})
    return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
