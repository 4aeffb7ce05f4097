"""Faults injected on purpose: each test causes one and checks the one line a user sees and what survives.
Each area has its own section below."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ======================================================================================================
# Distributed faults and the train step: a rank lost (dist.py, heartbeat.py), NaN/Inf losses
# (engine/nonfinite.py, Trainer.train_step)
# ======================================================================================================
import psutil  # noqa: E402
import torch  # noqa: E402

from singularity_ds import heartbeat  # noqa: E402
from singularity_ds.errors import RankLostError  # noqa: E402


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from singularity_ds.data.synthetic import make_synthetic
    out = tmp_path_factory.mktemp("corpus")
    make_synthetic(str(out), num_clips=36, size=32, frames=8, num_images=8, seed=5)
    return out


def _train_args(corpus, out_dir, *extra):
    return ["pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"), "image_res=32",
            "batch_size.video=4", "batch_size.image=4", "num_workers=0", "log_freq=1", *extra,
            f"output_dir={out_dir}"]


@pytest.fixture
def one_rank_in_process(monkeypatch):
    """A run of `singularity-ds train` inside this process: its rank variables, logging handlers and the
    task's losses are put back afterwards."""
    from singularity_ds.dist import free_port
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from singularity_ds.tasks.caption import CaptionTask
    original = CaptionTask.losses
    yield
    CaptionTask.losses = original
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_a_nonfinite_micro_step_skips_its_whole_update(small_corpus, tmp_path, one_rank_in_process):
    """ZeRO-0 in fp32 (DeepSpeed applies NaN gradients there as they come), two micro-steps per step: a
    NaN loss in the second micro-step of step 2 leaves the weights and the learning rate as step 1 left
    them (the first micro-step's gradient goes too); step 3 trains again. The log names the batch's media."""
    from nan_worker import inject_nan
    from singularity_ds.cli import main
    digests, out = [], tmp_path / "run"
    inject_nan({4}, digests)  # micro-steps 3 and 4 make optimizer step 2; digests[k] as micro-step k+1 starts
    args = _train_args(small_corpus, out, "ds_config=zero0", "precision=fp32",
                       "gradient_accumulation_steps=2", "max_steps=4", "save_every_steps=1",
                       "keep_last_checkpoints=5")
    assert main(["train", *args]) == 0
    after = {step: digests[2 * step] for step in range(4)}  # the weights after each optimizer step
    assert after[1] != after[0] and after[2] == after[1] and after[3] != after[2]
    history = json.load(open(out / "history.json"))
    assert [torch.isfinite(torch.tensor(r["loss"])).item() for r in history] == [True, False, True, True]
    assert history[1]["lr"] == history[0]["lr"] != history[2]["lr"]  # the schedule waits too
    log = (out / "train.log").read_text()
    warning = next(line for line in log.splitlines() if "non-finite loss on rank 0" in line)
    media = warning.split("media of its batch: ")[1].split(", ")
    assert "step 2:" in warning and "loss_itm=nan" in warning and len(media) == 8, warning  # 2 x 4 clips
    assert all(os.path.isfile(m) for m in media), media
    assert "step 2 skipped" in log
    # the skipped step writes no checkpoint, the others do
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")) == \
        ["step00000001", "step00000003", "step00000004"]


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(
        small_corpus, tmp_path, capsys, one_rank_in_process):
    """NaN from step 3 on, max_nonfinite_steps=3, a checkpoint every step and only one kept: the run stops
    after step 5 with one line, and the checkpoint of step 2 is still the latest."""
    from nan_worker import inject_nan
    from singularity_ds.cli import main
    out = tmp_path / "run"
    inject_nan(set(range(3, 100)), [])
    args = _train_args(small_corpus, out, "max_steps=8", "save_every_steps=1", "keep_last_checkpoints=1",
                       "max_nonfinite_steps=3")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("singularity-ds: error: the loss was NaN/Inf for 3 optimizer steps in a row "
                          "(steps 3-5"), err
    assert "resume=auto continues from step00000002" in err, err
    assert (out / "checkpoints" / "latest").read_text() == "step00000002"
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step")] == ["step00000002"]
    assert not (out / "export").exists()


def test_lost_ranks_are_the_ones_whose_heartbeat_stopped(monkeypatch):
    """Rank 0 of 2 (this process) with the rendezvous store; rank 1 beats from a thread. While it beats, a
    failure passes through unchanged; once it stops, a failure becomes one line naming rank 1. Without
    the store (rank 0's process gone), rank 1 names rank 0."""
    import threading
    from torch.distributed import TCPStore
    from singularity_ds.dist import free_port
    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(heartbeat, "INTERVAL", 0.2)
    silent = threading.Event()

    def rank1():
        client = TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
        while not silent.wait(0.2):
            client.add(heartbeat.KEY.format(1), 1)
    threading.Thread(target=rank1, daemon=True).start()
    heartbeat.start(0, 2)
    try:
        with pytest.raises(ValueError, match="not about ranks"):
            with heartbeat.reporting_lost_ranks():
                raise ValueError("not about ranks")
        assert heartbeat._beat is None  # a failing rank stops beating: the others see it go
        heartbeat.start(0, 2)
        silent.set()
        time.sleep(0.5)
        assert heartbeat.lost_ranks(0, 2) == [1]
        with pytest.raises(RankLostError) as info:
            with heartbeat.reporting_lost_ranks():
                raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:1234. GLHF\nmore")
        message = str(info.value)
        assert message.startswith("rank 1 of 2 was lost (its heartbeat stopped") and "\n" not in message
        assert "rank 0 stopped too (RuntimeError: [pair.cc:561] Connection closed by peer" in message
    finally:
        heartbeat.stop()
    del server  # the store goes with rank 0's process
    assert heartbeat.lost_ranks(1, 2) == [0]


# --- two ranks under the real `deepspeed` launcher (CPU, gloo)

def _deepspeed(*args):
    from singularity_ds.dist import free_port
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [launcher, "--num_accelerators", "2", "--master_port", str(free_port()), *args]


def _start(cmd, log_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _rank_process(launcher, local_rank: int):
    """The process of one rank (a child of the launcher's launch.py)."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmdline = p.cmdline()
                if f"--local_rank={local_rank}" in cmdline and "deepspeed.launcher.launch" not in cmdline:
                    return p
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise AssertionError("rank process not found")


def _wait_for_checkpoint(run_dir, tag: str, proc, timeout=600):
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text() >= tag:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {tag} in {run_dir} (rc {proc.poll()})")


@pytest.mark.slow
def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(small_corpus, tmp_path):
    """Rank 1's loss is NaN in step 2 (ZeRO-0, fp32: DeepSpeed itself would apply it): both ranks skip
    the update (their weights stay equal and unchanged), rank 1 names its batch's media."""
    out, digests = tmp_path / "run", tmp_path / "digests"
    cmd = _deepspeed("tests/nan_worker.py", str(digests), "1", "2",
                     *_train_args(small_corpus, out, "ds_config=zero0", "precision=fp32", "max_steps=3"))
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d0, d1 = (json.load(open(f"{digests}.{r}.json")) for r in (0, 1))
    assert d0 == d1 and len(d0) == 3  # the same weights on both ranks as each step starts
    assert d0[1] != d0[0] and d0[2] == d0[1]  # step 1 trained, step 2 did not
    assert "non-finite loss on rank 1" in proc.stdout + proc.stderr
    history = json.load(open(out / "history.json"))
    assert [torch.isfinite(torch.tensor(r["loss_itm"])).item() for r in history] == [True, False, True]


@pytest.mark.slow
def test_a_killed_rank_is_named_and_the_other_stops(small_corpus, tmp_path):
    """SIGKILL rank 0 (it also serves the rendezvous store) mid-run: rank 1 stops within seconds with one
    line naming rank 0, and the launcher exits non-zero."""
    out = tmp_path / "run"
    proc = _start(_deepspeed("--module", "singularity_ds", "train", *_train_args(
        small_corpus, out, "max_steps=40", "save_every_steps=2")), tmp_path / "log")
    try:
        _wait_for_checkpoint(out, "step00000002", proc)
        time.sleep(1.0)  # mid-step
        killed = time.time()
        _rank_process(proc, 0).send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "log").read_text()
    assert rc != 0 and time.time() - killed < 60, log[-3000:]
    lines = [line for line in log.splitlines() if "singularity-ds: error:" in line]
    assert len(lines) == 1 and "rank 0 of 2 was lost (its heartbeat stopped" in lines[0], log[-3000:]
    assert "rank 1 stopped too" in lines[0]


@pytest.mark.slow
def test_a_frozen_rank_times_out_is_named_and_resume_is_bit_identical(small_corpus, tmp_path):
    """SIGSTOP rank 1 (a frozen node: its sockets stay open, nothing errors): rank 0 stops after
    dist_timeout with one line naming rank 1 instead of waiting for ever; resume=auto then repeats the
    uninterrupted run's steps bit for bit."""
    args = ("max_steps=6", "save_every_steps=2", "keep_last_checkpoints=3", "dist_timeout=45")
    whole = tmp_path / "whole"
    proc = _start(_deepspeed("--module", "singularity_ds", "train", *_train_args(small_corpus, whole, *args)),
                  tmp_path / "whole.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    reference = {r["step"]: r for r in json.load(open(whole / "history.json"))}

    frozen = tmp_path / "frozen"
    proc = _start(_deepspeed("--module", "singularity_ds", "train",
                             *_train_args(small_corpus, frozen, *args)), tmp_path / "frozen.log")
    try:
        _wait_for_checkpoint(frozen, "step00000002", proc)
        time.sleep(0.5)
        stopped = time.time()
        _rank_process(proc, 1).send_signal(signal.SIGSTOP)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    waited, log = time.time() - stopped, (tmp_path / "frozen.log").read_text()
    # the timeout, the heartbeat check, then the launcher's 30 s before it SIGKILLs the frozen rank
    assert rc != 0 and 40 < waited < 45 + 90, (waited, log[-3000:])
    lines = [line for line in log.splitlines() if "singularity-ds: error:" in line]
    assert len(lines) == 1 and "rank 1 of 2 was lost (its heartbeat stopped" in lines[0], log[-3000:]
    assert not (frozen / "export").exists()

    proc = _start(_deepspeed("--module", "singularity_ds", "train",
                             *_train_args(small_corpus, frozen, *args, "resume=auto")),
                  tmp_path / "resumed.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    resumed = json.load(open(frozen / "history.json"))
    assert resumed and resumed[-1]["step"] == 6
    for r in resumed:
        for k in ("loss_ita", "loss_itm", "loss_mlm", "lr"):
            assert r[k] == reference[r["step"]][k], (r["step"], k, r[k], reference[r["step"]][k])
