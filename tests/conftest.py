import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when it is first imported (DeepSpeed imports it early): set it for the
# whole session so the kernel tests run the kernels on CPU tensors; nothing else here uses Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach the real Hugging Face Hub: a Hub repo id not in the cache is an error, not a download
# (read when huggingface_hub is first imported). tests/test_hub.py downloads from a local Hub in children.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SINGULARITY_REFERENCE", REPO.parent / "shared" / "reference"))


# The markers (slow, multiproc, gpu) are registered in pyproject.toml, with --strict-markers.
def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped without CUDA (the marker alone says what they need)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The synthetic corpus (videos, images, annotations, config overlays, tar shards), made once per
    session; tests read it and write elsewhere. Tests that need other sizes or codecs make their own."""
    from singularity_ds.data.synthetic import make_synthetic
    out = tmp_path_factory.mktemp("corpus")
    make_synthetic(str(out), num_clips=36, size=32, frames=8, num_images=8, seed=5)
    return out


@pytest.fixture
def free_port():
    """A free TCP port on 127.0.0.1 (one per test: a process group's master port)."""
    from singularity_ds.dist import free_port
    return free_port()


def reference(name: str) -> Path:
    """A fixture folder in ../shared/reference (read in place, never copied into the repo)."""
    path = REFERENCE / name
    if not (path / "checkpoint.pth").is_file():
        pytest.skip(f"reference fixture {path} is absent (it lives beside the repo in ../shared)")
    return path


@pytest.fixture(scope="session")
def tiny_ref():
    path = reference("singularity_tiny")
    return dict(path=path,
                inputs=torch.load(path / "inputs.pt", weights_only=True),
                expected=torch.load(path / "expected.pt", weights_only=True))


def tiny_config(**overrides):
    """The packaged tiny preset, with dotted overrides."""
    from singularity_ds.config import load_config
    return load_config(["pretrain", "tiny"], [f"{k}={v}" for k, v in overrides.items()])


# One name per timm family the vision tower takes (vit_type=timm), built small and random: timm's own
# architecture with a narrow, shallow trunk (timm_model_args). The resolution is a multiple of the patch.
TIMM_FAMILIES = {
    "clip": "vit_base_patch16_clip_224.openai",
    "siglip": "vit_base_patch16_siglip_224",          # no [CLS]: attention-pool head (MAP)
    "eva02": "eva02_base_patch14_224.mim_in22k",      # rotary embeddings, SwiGLU
    "dinov2": "vit_small_patch14_reg4_dinov2",        # [CLS] + 4 registers, layer scale
    "deit": "deit_base_patch16_224",
}
TIMM_SMALL = "{embed_dim: 64, depth: 2, num_heads: 2}"


def timm_overrides(family: str) -> list:
    """CLI overrides for a small random tower of ``family`` at 28 px (patch 14) or 32 px (patch 16)."""
    name = TIMM_FAMILIES[family]
    return ["vit_type=timm", f"timm_model={name}", f"timm_model_args={TIMM_SMALL}",
            f"image_res={28 if 'patch14' in name else 32}"]


def pytest_sessionfinish(session, exitstatus):
    """Runs killed on purpose (kill-and-resume) cannot release DeepSpeed's /dev/shm allreduce buffers;
    remove the ones this session created (~69 MB each, they would stay in RAM)."""
    import glob
    import time
    start = getattr(session.config, "_sds_start", time.time())
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.path.getmtime(path) >= start:
                os.unlink(path)
        except OSError:
            pass


def pytest_sessionstart(session):
    import time
    session.config._sds_start = time.time()


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launch_variables_left():
    """An in-process run (`cli.main(["train", ...])`) sets RANK/MASTER_PORT/... in this process, as a
    launcher would; a subprocess a later test starts would inherit them and try to serve its rendezvous
    on the port this process's store still holds (EADDRINUSE). Put the environment back after each test."""
    before = {k: os.environ.get(k) for k in LAUNCH_VARIABLES}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def release(tmp_path_factory, corpus):
    """The fake released tree (tests/release_tree.py): checkpoints and data folders as the original's."""
    from release_tree import make_tree
    return make_tree(tmp_path_factory.mktemp("release"), corpus, reference)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real 2-node SLURM cluster on this machine (tests/slurm_cluster.py), started once per session."""
    from slurm_cluster import SlurmCluster, missing_binaries
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM binaries {missing} not installed "
                    "(`make install` installs Debian's slurm-wlm as root)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
