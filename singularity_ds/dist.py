"""Process-group set-up for every launcher: deepspeed, torchrun, srun (SLURM), or a plain process.

Rank variables: ``RANK/WORLD_SIZE/LOCAL_RANK`` (deepspeed, torchrun), else ``SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID`` with the master address taken from ``SLURM_JOB_NODELIST``, else a single process on
127.0.0.1. Without CUDA, DeepSpeed's CPU accelerator and gloo are selected automatically.
"""
import os
import socket
import subprocess

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodes.split(",")[0]
    if first in (socket.gethostname(), socket.gethostname().split(".")[0]):
        return "127.0.0.1"
    try:
        return socket.gethostbyname(first)
    except OSError:
        return first


def rank_env() -> dict:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from whatever launched us."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _slurm_master())
        env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 2000))
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    return dict(rank=int(env["RANK"]), world=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)))


def setup() -> dict:
    """Initialise torch.distributed through DeepSpeed; returns rank, world, local_rank, device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    info = rank_env()
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(info["local_rank"])
        info["device"] = torch.device("cuda", info["local_rank"])
    else:
        info["device"] = torch.device("cpu")
    return info


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def rank_world() -> tuple:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """Every rank's ``obj`` (CPU tensors, arrays, lists), in rank order; ``[obj]`` without distribution."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def release_cpu_shm():
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory allreduce (69 MB per rank,
    ``deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``): DeepSpeed never removes it, so every
    multi-rank CPU run would leave it in RAM for good. Called once no rank communicates any more; the
    mapping stays valid until the process exits. (A run killed with SIGKILL still leaves its files.)"""
    if torch.cuda.is_available() or not torch.distributed.is_initialized():
        return
    barrier()
    import glob
    env = os.environ
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}_{env.get('LOCAL_RANK', '0')}"
    for path in glob.glob(pattern):
        try:
            os.unlink(path)
        except OSError:
            pass


def mean_over_ranks(values: list) -> list:
    """The element-wise mean of a list of floats over all ranks (one all-reduce); as is without
    distribution. Used for what is logged, so a run's loss curve is the global batch's, not rank 0's."""
    world = rank_world()[1]
    if world == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (t / world).tolist()
