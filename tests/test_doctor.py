"""`singularity-ds doctor` and the start-up preflight: what a run would meet, found before it starts."""
import json
import os
import shutil

import pytest

from singularity_ds.cli import main


@pytest.fixture
def damaged(corpus, tmp_path):
    """A copy of the synthetic corpus's pretraining videos with one garbage and one missing clip."""
    root = tmp_path / "c"
    shutil.copytree(corpus / "videos", root / "videos")
    shutil.copytree(corpus / "images", root / "images")
    entries = json.load(open(corpus / "anno" / "pretrain_video.json"))
    clips = sorted({e["video"] for e in entries})
    (root / "videos" / clips[0]).write_bytes(b"not a video")
    (root / "videos" / clips[1]).unlink()
    overlay = tmp_path / "pt.yaml"
    overlay.write_text(
        "available_corpus:\n"
        f"  mine: [[{corpus / 'anno' / 'pretrain_video.json'}, {root / 'videos'}, video],"
        f" [{corpus / 'anno' / 'pretrain_image.json'}, {root / 'images'}]]\n"
        "train_corpus: mine\n")
    images = json.load(open(corpus / "anno" / "pretrain_image.json"))
    return dict(overlay=str(overlay), root=root, clips=clips, videos=len(entries), images=len(images),
                distinct_videos=len(clips), distinct_images=len({e["image"] for e in images}))


def test_doctor_reads_every_media_and_lists_the_missing_and_broken(damaged, capsys):
    args = ["doctor", "pretrain", "tiny", damaged["overlay"], "image_res=32", "batch_size.video=4",
            "batch_size.image=3", "gradient_accumulation_steps=2", "--media-fraction", "1", "--workers", "2",
            "--world", "2"]
    assert main(args) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("train_file[")}
    assert rows["train_file[0]"][1:6] == ["video", str(damaged["videos"]),
                                          str(damaged["distinct_videos"]), "1", "1"]
    assert rows["train_file[1]"][1:6] == ["image", str(damaged["images"]),
                                          str(damaged["distinct_images"]), "0", "0"]
    missing = [line for line in out.splitlines() if line.startswith("missing")]
    broken = [line for line in out.splitlines() if line.startswith("broken")]
    assert missing == [f"missing  train_file[0]: {damaged['root'] / 'videos' / damaged['clips'][1]}"]
    assert len(broken) == 1 and str(damaged["root"] / "videos" / damaged["clips"][0]) in broken[0]
    steps = ((damaged["videos"] // 2) // 4 + (damaged["images"] // 2) // 3) // 2
    assert f"steps per epoch: {steps} optimizer steps with 2 rank(s)" in out


def test_doctor_is_clean_on_the_intact_corpus(corpus, capsys):
    args = ["doctor", "train_ret", "tiny", str(corpus / "configs" / "ret.yaml"), "image_res=32",
            "batch_size.video=4", "--media-fraction", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    motion = json.load(open(corpus / "anno" / "ret_test_motion.json"))
    assert any(line.split()[:3] == ["test_file.motion",
                                    "video", str(len(motion))] for line in out.splitlines())
    assert not [line for line in out.splitlines() if line.startswith(("missing", "broken", "..."))]


def test_doctor_fewer_entries_than_a_batch_is_no_step_not_broken_media(corpus, tmp_path, capsys):
    """Exit 1 for the step count alone, without a line about missing or broken media it did not find; a long
    set name widens the first column instead of breaking it."""
    long_name = "a_rather_long_test_set_name_for_the_column"
    overlay = tmp_path / "long.yaml"
    overlay.write_text(f"test_file:\n  {long_name}: [{corpus / 'anno' / 'ret_test_motion.json'}, "
                       f"{corpus / 'videos'}, video]\ntest_types: [{long_name}]\n")
    args = ["doctor", "train_ret", "tiny", str(corpus / "configs" / "ret.yaml"), str(overlay), "image_res=32",
            "batch_size.video=100000", "--media-fraction", "1"]
    assert main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "no training step: every media type has fewer entries per rank than its batch size " \
           "(batch_size)" in lines
    assert not [line for line in lines if "missing or broken" in line]
    head = next(line for line in lines if line.startswith("corpus "))
    row = next(line for line in lines if line.startswith(f"test_file.{long_name} "))
    assert row.index(" video ") == head.index(" type ")  # the columns line up
    assert row.split()[1:6] == ["video", str(len(json.load(open(corpus / "anno" / "ret_test_motion.json")))),
                                row.split()[3], "0", "0"]


def test_doctor_stops_with_one_line_on_a_bad_run(corpus, tmp_path, capsys):
    base = ["doctor", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml")]
    cases = [(base + ["video_input.num_frame=2"], "did you mean 'video_input.num_frames'"),
             (base + [f"pretrained_path={tmp_path / 'nope.pth'}"], "nope.pth: no such file"),
             (base + ["--media-fraction", "0"], "--media-fraction 0.0: expected a number in (0, 1]")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (argv, err)


def test_training_refuses_a_wrong_media_folder_before_writing_anything(corpus, tmp_path, capsys):
    overlay = tmp_path / "pt.yaml"
    overlay.write_text("available_corpus:\n"
                       f"  mine: [{corpus / 'anno' / 'pretrain_video.json'}, "
                       f"{tmp_path / 'no_such_dir'}, video]\n"
                       "train_corpus: mine\n")
    out = tmp_path / "run"
    assert main(["train", "pretrain", "tiny", str(overlay), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"media folder {tmp_path / 'no_such_dir'} does not exist" in err
    assert not out.exists()
    # a folder that exists but holds none of the corpus's files (a wrong data_root)
    (tmp_path / "empty").mkdir()
    overlay.write_text(overlay.read_text().replace("no_such_dir", "empty"))
    assert main(["train", "pretrain", "tiny", str(overlay), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "none of its first" in err and str(tmp_path / "empty") in err and not out.exists()
    assert os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("where", ["train_file", "test_file"])
def test_a_bad_entry_deep_in_a_file_stops_training_before_writing_anything(corpus, tmp_path, capsys, where):
    """An entry past the first ones (which the preflight reads) with a bad caption: one line, exit 2, and
    no run folder, as for every annotation error (README "Failure behaviour": before any work)."""
    name = "pretrain_video.json" if where == "train_file" else "ret_test_motion.json"
    entries = json.load(open(corpus / "anno" / name))
    entries[-1]["caption"] = [1] if where == "train_file" else 7
    anno = tmp_path / name
    anno.write_text(json.dumps(entries))
    overlay = tmp_path / "o.yaml"
    if where == "train_file":
        overlay.write_text(f"train_file: [[{anno}, {corpus / 'videos'}, video]]\n")
        args = ["train", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"), str(overlay)]
    else:
        overlay.write_text(f"test_file:\n  motion: [{anno}, {corpus / 'videos'}, video]\n"
                           "test_types: [motion]\n")
        args = ["train", "train_ret", "tiny", str(corpus / "configs" / "ret.yaml"), str(overlay)]
    out = tmp_path / "run"
    assert main(args + ["image_res=32", "batch_size.video=4", "num_workers=0", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"singularity-ds: error: {anno}: entry {len(entries) - 1}: "), err
    assert not out.exists()
