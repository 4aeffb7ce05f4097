"""Faults injected on purpose: each ends in one clear line naming the file, entry or key, and nothing
already written is lost."""
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from singularity_ds.cli import main
from singularity_ds.data.synthetic import make_synthetic


# ====================================================================================================
# Run folder, checkpoints and exports (faults_run): corrupt exports, damaged checkpoints and resume=auto,
# a full or read-only disk during a save, the run folder after a resume or a failed start, annotation
# files changed before a resume, exports evaluated at their own resolution.
# ====================================================================================================
from singularity_ds.engine.manifest import check_manifest  # noqa: E402
from singularity_ds.models import Singularity, load_model  # noqa: E402
from singularity_ds.models.weights import export  # noqa: E402


@pytest.fixture(scope="module")
def run_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_corpus")
    make_synthetic(str(out), num_clips=36, size=32, frames=8, num_images=8, seed=5)
    return out


def video_overlay(corpus, folder) -> str:
    """A training overlay on a private copy of the video annotations (tests may edit it)."""
    anno = folder / "anno.json"
    shutil.copy(corpus / "anno" / "pretrain_video.json", anno)
    overlay = folder / "data.yaml"
    overlay.write_text(f"train_file: ['{anno}', '{corpus / 'videos'}', video]\n")
    return str(overlay)


def train(overlay, out, *extra):
    return main(["train", "pretrain", "tiny", overlay, "image_res=32", "batch_size.video=4", "num_workers=0",
                 "log_freq=1", *extra, f"output_dir={out}"])


def error_line(capsys) -> str:
    """The one ``singularity-ds: error:`` line of the last command (and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("singularity-ds: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def history(out) -> list:
    return [r["step"] for r in json.load(open(out / "history.json"))]


def tiny_export(folder, **overrides):
    from conftest import tiny_config
    torch.manual_seed(0)
    model = Singularity(tiny_config(image_res=32, tower_init="random", **overrides))
    export(model, str(folder))
    return model


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_export_weights_are_one_line(tmp_path, damage):
    tiny_export(tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    data = weights.read_bytes()
    damaged = {"truncated": data[:len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage]
    weights.write_bytes(damaged)
    with pytest.raises(Exception) as e:
        load_model(str(tmp_path / "export"))
    msg = str(e.value)
    assert type(e.value).__name__ == "CheckpointError" and "\n" not in msg, msg
    assert msg.startswith(f"{weights}: not a readable safetensors file") and "export it again" in msg


def test_corrupt_export_config_is_one_line_in_load_model_eval_and_training(tmp_path, capsys, monkeypatch):
    tiny_export(tmp_path / "export")
    cfg = tmp_path / "export" / "config.json"
    cfg.write_text(cfg.read_text()[:200])
    with pytest.raises(Exception, match=rf"^{cfg}: not valid JSON \(.* at line \d+, column \d+\); the "
                                        r"export is damaged"):
        load_model(str(tmp_path / "export"))
    monkeypatch.setenv("SL_DATA_DIR", str(tmp_path))  # the packaged corpora's root (never read here)
    assert main(["eval", "ret", "ret_msrvtt", "tiny", str(tmp_path / "export")]) == 2
    assert f"{cfg}: not valid JSON" in error_line(capsys)
    out = tmp_path / "run"
    assert main(["train", "train_ret", "tiny", f"pretrained_path={tmp_path / 'export'}",
                 f"output_dir={out}"]) == 2
    assert f"{cfg}: not valid JSON" in error_line(capsys)


def test_export_is_self_contained_and_eval_follows_its_image_res(run_corpus, tmp_path, capsys):
    """An export loads without the architecture file its training named; `eval` runs it at the image_res
    it was trained at (tiny.yaml says 64), and an explicit other one names the file, tensor and key."""
    from singularity_ds.models.arch import ARCH_DIR
    arch = tmp_path / "my_bert.json"
    arch.write_text((ARCH_DIR / "config_bert_tiny.json").read_text())
    model = tiny_export(tmp_path / "export", bert_config=str(arch))
    arch.unlink()
    again = load_model(str(tmp_path / "export"))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    args = ["eval", "ret", "ret_msrvtt", "tiny", str(run_corpus / "configs" / "ret.yaml"),
            str(tmp_path / "export"), "test_types=[motion]", "k_test=4", "max_txt_l=16",
            "video_input.num_frames_test=1"]
    assert main(args + [f"output_dir={tmp_path / 'eval'}"]) == 0
    assert "r_mean" in json.loads((tmp_path / "eval" / "eval.json").read_text())["motion"]["itm"]
    capsys.readouterr()
    assert main(args + ["image_res=64", f"output_dir={tmp_path / 'eval64'}"]) == 2
    line = error_line(capsys)
    assert f"{tmp_path / 'export'}: vision_encoder." in line and "relative_position_bias_table" in line
    assert "image_res=64" in line and "load it with image_res=32" in line


def test_resume_auto_skips_a_damaged_checkpoint_and_the_run_keeps_every_step(run_corpus, tmp_path, capsys):
    overlay = video_overlay(run_corpus, tmp_path)
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = ("save_every_steps=2", "keep_last_checkpoints=4")
    assert train(overlay, reference, "max_steps=6", *args) == 0
    # step 6 is due (save_every_steps) and ends the run: saved (and hashed) once
    assert (reference / "train.log").read_text().count("step00000006 saved") == 1
    # a run that stops after step 5 (its last checkpoint, step 5, then cut short on disk) ...
    assert train(overlay, out, "max_steps=5", *args) == 0
    ckpts = out / "checkpoints"
    assert check_manifest(str(ckpts / "step00000005")) is None
    shard = next((ckpts / "step00000005").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    # ... named explicitly: one line naming the file
    assert train(overlay, out, "max_steps=6", *args, "resume=step00000005") == 2
    line = error_line(capsys)
    assert f"resume=step00000005: {shard} is 1000 bytes, the manifest says" in line
    # ... resume=auto: falls back to step 4, says why, replays step 5
    assert train(overlay, out, "max_steps=6", *args, "resume=auto") == 0
    log = (out / "train.log").read_text()
    assert f"skipping checkpoint step00000005: {shard} is 1000 bytes" in log
    assert "resumed from step00000004" in log
    got, want = json.load(open(out / "history.json")), json.load(open(reference / "history.json"))
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):
        assert (a["loss_ita"], a["loss_mlm"], a["lr"]) == (b["loss_ita"], b["loss_mlm"], b["lr"]), a["step"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    # a damaged checkpoint of an earlier version (no manifest): DeepSpeed's failure is one line too
    ckpt6 = ckpts / "step00000006"
    os.remove(ckpt6 / "manifest.json")
    shard6 = next(ckpt6.glob("*optim_states.pt"))
    shard6.write_bytes(shard6.read_bytes()[:1000])
    assert train(overlay, out, "max_steps=7", *args, "resume=step00000006") == 2
    assert f"{ckpt6}: DeepSpeed could not load this checkpoint (" in error_line(capsys)


@pytest.fixture
def small_disk(tmp_path):
    """``mount(fs_folder)`` makes ``fs_folder`` a 90 MiB tmpfs (one tiny checkpoint fits, not two);
    ``read_only(fs_folder)`` remounts it read-only. Skipped where mounting is not allowed."""
    mounted = []

    def mount(folder):
        folder.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=90m", "tmpfs", str(folder)],
                              capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()})")
        mounted.append(folder)

    def read_only(folder):
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

    yield mount, read_only
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_full_or_read_only_disk_during_a_save_keeps_the_previous_checkpoint(run_corpus, tmp_path, capsys,
                                                                            small_disk):
    mount, read_only = small_disk
    overlay = video_overlay(run_corpus, tmp_path)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    mount(ckpts)
    assert train(overlay, out, "max_steps=4", "save_every_steps=2", "keep_last_checkpoints=3") == 2
    line = error_line(capsys)
    assert line.startswith(f"singularity-ds: error: checkpoint step00000004 could not be written to {ckpts} ")
    assert re.search(r"; \d+ MiB free there, a checkpoint takes \d+ MiB\); checkpoint step00000002 and "
                     r"'latest' are intact: free space or make the folder writable, then rerun with "
                     r"resume=auto$", line), line
    assert (ckpts / "latest").read_text() == "step00000002"
    assert check_manifest(str(ckpts / "step00000002")) is None
    assert not (ckpts / ".tmp" / "step00000004").exists()  # the partial save's space is given back
    assert line[len("singularity-ds: error: "):] in (out / "train.log").read_text()
    read_only(ckpts)
    assert train(overlay, out, "max_steps=4", "save_every_steps=2", "resume=auto") == 2
    line = error_line(capsys)
    assert f"could not be written to {ckpts} (Read-only file system" in line
    assert "checkpoint step00000002 and 'latest' are intact" in line


def test_a_failed_start_is_logged_and_does_not_block_the_rerun(run_corpus, tmp_path, capsys):
    overlay = video_overlay(run_corpus, tmp_path)
    out = tmp_path / "run"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert train(overlay, out, "max_steps=2", f"pretrained_path={tmp_path / 'broken'}") == 2
    line = error_line(capsys)
    assert "model.safetensors: not a readable safetensors file" in line
    assert line[len("singularity-ds: error: "):] in (out / "train.log").read_text()
    partial = out / "checkpoints" / ".tmp" / "step00000099"  # as a save killed midway leaves it
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    assert train(overlay, out, "max_steps=2") == 0  # the corrected rerun, same folder, no resume
    assert not partial.exists() and history(out) == [1, 2]
    # the first attempt's line stays (train.log is appended to)
    assert "not a readable safetensors file" in (out / "train.log").read_text()
    (out / "notes.txt").write_text("mine")
    assert train(overlay, tmp_path / "run", "max_steps=2") == 2
    assert "exists and is not empty (it holds checkpoint step00000002)" in error_line(capsys)


def test_resume_refuses_changed_annotations_unless_allowed(run_corpus, tmp_path, capsys):
    overlay = video_overlay(run_corpus, tmp_path)
    out = tmp_path / "run"
    assert train(overlay, out, "max_steps=2") == 0
    anno = tmp_path / "anno.json"
    entries = json.loads(anno.read_text())
    anno.write_text(json.dumps(entries + entries[:4]))
    assert train(overlay, out, "max_steps=3", "resume=auto") == 2
    line = error_line(capsys)
    assert f"train_file {anno} changed since checkpoint step00000002 ({len(entries)} entries, sha256 " in line
    assert f"then, {len(entries) + 4} entries, sha256 " in line and "resume_allow_data_change=True" in line
    assert train(overlay, out, "max_steps=3", "resume=auto", "resume_allow_data_change=True") == 0
    assert history(out) == [1, 2, 3]
