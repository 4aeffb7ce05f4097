"""Process-group set-up for every launcher: deepspeed, torchrun, srun (SLURM), or a plain process.

Rank variables: ``RANK/WORLD_SIZE/LOCAL_RANK`` (deepspeed, torchrun), else ``SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID`` with the master address taken from ``SLURM_JOB_NODELIST``, else a single process on
127.0.0.1. Without CUDA, DeepSpeed's CPU accelerator and gloo are selected automatically.
"""
import datetime
import os
import socket
import subprocess
import sys

import torch

from . import heartbeat


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
    own_port = False
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        own_port = "MASTER_PORT" not in env
        env.setdefault("MASTER_PORT", str(free_port()))
    return dict(rank=int(env["RANK"]), world=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                own_port=own_port)


def pin_ninja():
    """Build DeepSpeed's JIT ops (the CPU shared-memory allreduce ``deepspeed_shm_comm`` every CPU run
    loads, ``cpu_adam`` for offloading) with the ``ninja`` installed beside this interpreter, whatever
    PATH says. torch runs the first ``ninja`` on PATH, and two versions (the venv's pip ninja 1.13 when
    its ``bin`` leads PATH, as under ``make``; the system's 1.11 when ``.venv/bin/singularity-ds`` is run
    directly) hash the commands in the build folder's ``.ninja_log`` differently: each took the other's
    build for stale and rebuilt it, 100-200 s on two cores, at every switch."""
    here = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.access(os.path.join(here, "ninja"), os.X_OK) and path.split(os.pathsep)[0] != here:
        os.environ["PATH"] = here + os.pathsep + path if path else here


def build_ops():
    """JIT-build (or find built) the DeepSpeed ops a CPU run loads, once: ``make install`` calls it so
    that the first run does not wait for the compiler."""
    if torch.cuda.is_available():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pin_ninja()
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    ShareMemCommBuilder().load(verbose=False)


def setup(timeout: float = None) -> dict:
    """Initialise torch.distributed through DeepSpeed; returns rank, world, local_rank, device.

    ``timeout``: seconds a collective (and the start-up rendezvous) waits for the other ranks before it
    fails (config ``dist_timeout``; None: DeepSpeed's default, ``DEEPSPEED_TIMEOUT`` minutes or 10), so
    that a rank that outlives a lost one stops instead of waiting for ever. Starts this rank's heartbeat
    (:mod:`.heartbeat`), which tells which rank was lost."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pin_ninja()  # before DeepSpeed loads (and may build) its ops
    info = rank_env()
    import deepspeed
    if not torch.distributed.is_initialized():
        limit = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
        for attempt in range(3):
            try:
                deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                           verbose=False, **limit)
                break
            except torch.distributed.DistNetworkError as e:
                # a port picked here (one process, no launcher) can be taken between free_port()
                # closing it and the store binding it: pick another; a launcher's port is its own
                if not info.pop("own_port", False) or "EADDRINUSE" not in str(e) or attempt == 2:
                    raise
                os.environ["MASTER_PORT"] = str(free_port())
                info["own_port"] = True
    info.pop("own_port", None)
    heartbeat.start(info["rank"], info["world"])
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


def release_cpu_shm(failed: bool = False):
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory allreduce (69 MB per rank,
    ``deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``): DeepSpeed never removes it, so every
    multi-rank CPU run would leave it in RAM for good. Called once no rank communicates any more; the
    mapping stays valid until the process exits. ``failed``: the run stops because a rank was lost, so
    there is no barrier to wait at, and this node's buffers all go (the lost rank cannot unlink its
    own). (A run killed with SIGKILL as a whole still leaves its files.)"""
    if torch.cuda.is_available() or not torch.distributed.is_initialized():
        return
    if not failed:
        barrier()
    import glob
    env = os.environ
    rank = "*" if failed else env.get("LOCAL_RANK", "0")
    job = f"{env.get('MASTER_ADDR')}_{env.get('MASTER_PORT')}"
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_{job}_{rank}"
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
