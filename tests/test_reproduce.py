"""`singularity-ds reproduce`: the paper's rows, found and evaluated on a fake released tree.

The tree (tests/release_tree.py, the session's `release` fixture) is laid out as the released archives
and the original's data folders are."""
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from singularity_ds import cli
from singularity_ds.paper import load as load_paper
from singularity_ds.reproduce import run as reproduce

PAPER = load_paper()


@pytest.fixture(scope="module")
def tree(release):
    return release


def run_cli(args, capsys):
    rc = cli.main(["reproduce", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_registry_holds_the_papers_numbers(monkeypatch):
    """The rows the issue quotes from the seed's tables, and every row's shape."""
    quoted = {"msrvtt-ret-1f-5m": (36.8, 65.9, 75.5), "msrvtt-ret-1f-17m": (41.5, 68.7, 77.0),
              "didemo-ret-1f-5m": (47.4, 75.2, 84.0), "didemo-ret-1f-17m": (53.9, 79.4, 86.9),
              "anet-ret-1f-5m": (43.0, 70.6, 81.3), "anet-ret-1f-17m": (47.1, 75.5, 85.5),
              "msrvtt-qa-1f-5m": (42.7,), "msrvtt-qa-1f-17m": (43.5,), "anet-qa-1f-5m": (41.8,),
              "anet-qa-1f-17m": (43.1,), "msrvtt-mc-1f-5m": (92.0,), "msrvtt-mc-1f-17m": (92.1,)}
    for row, numbers in quoted.items():
        assert PAPER.rows[row].paper == numbers
    assert len(PAPER.rows) == 42
    from singularity_ds.config import load_config
    monkeypatch.setenv("SL_DATA_DIR", "/D")
    for split in PAPER.splits.values():  # each split is a test_file entry of its packaged config
        anno, media = load_config([split.config], []).test_file[split.key][:2]
        assert (anno, media) == (f"/D/anno_downstream/{split.annotation}",
                                 f"/D/videos_images/{PAPER.media[split.media]['folder']}")
    frames = {r.group: r.frames for r in PAPER.rows.values()}
    assert frames["anet-ret"] == frames["anet-zs"] == 32 and frames["msrvtt-ret"] == 12 and frames["vqa"] == 1


def test_list_prints_every_row_with_numbers_and_source(capsys):
    rc, out, _ = run_cli(["--list"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 1 + len(PAPER.rows) + 1
    row = next(line for line in lines if line.startswith("ssv2-template-ret-temporal-17m "))
    assert row.endswith("t2v R@1, t2v R@5, t2v R@10: 77.6 / 96.0 / 98.9 ([ACL] Table 3 (R@1 also on "
                        "PapersWithCode, v1))")
    assert next(line for line in lines if line.startswith("vqa-1f-5m ")).endswith(
        "test-dev, test-std: 70.30 / 70.53 ([ACL] Table 12)")


def test_dry_run_resolves_every_row(tree, capsys):
    """One line per row with the exact eval command: the right archive file, the paper's frames, the
    temporal flags from the weights; each split's size against the paper's as a warning line."""
    rc, out, err = run_cli(["all", "--dry-run", "--checkpoints", tree["ckpts"], "--data", tree["data"]],
                           capsys)
    assert rc == 0, err
    commands = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(commands) == len(PAPER.rows)
    for row, command in zip(PAPER.rows.values(), commands):
        argv = shlex.split(command)
        assert argv[:3] == [f"SL_DATA_DIR={tree['data']}", "singularity-ds", "eval"]
        kind, config, ckpt, *overrides = argv[3:]
        assert (kind, config) == (row.task, row.split.config)
        name = os.path.basename(ckpt)
        assert ("temporal" in name) == row.temporal and f"_{row.corpus}.pth" in name
        assert os.path.basename(os.path.dirname(ckpt)) == row.archive
        assert f"video_input.num_frames_test={row.frames}" in overrides
        assert f"test_types=[{row.split.key}]" in overrides
        assert ("temporal_vision_encoder.num_layers=1" in overrides) == row.temporal
    assert ("warning: msrvtt-ret-1f-5m: test_file.msrvtt_1k_test ("
            f"{tree['data']}/anno_downstream/msrvtt_ret_test1k.json): 6 clips in the annotation, the paper's "
            "MSRVTT 1k-A test (Yu et al. 2018) has 1,000") in err.splitlines()
    assert (f"warning: msrvtt-ret-1f-5m: {tree['data']}/videos_images/msrvtt_2fps_224: shorter side 32 px in "
            "5 sampled files, the original's msrvtt_2fps_224 is 224 px (singularity-ds preprocess videos SRC "
            "DST --preset msrvtt)") in err.splitlines()


# a real run of every kind of row: fine-tuned / zero-shot / temporal / paragraph / image retrieval, QA,
# multiple choice, and the server-scored VQA
KINDS = ["msrvtt-ret-1f-5m", "didemo-ret-temporal-17m", "msrvtt-zs-1f-17m", "coco-ret-1f-5m",
         "msrvtt-qa-temporal-5m", "msrvtt-mc-1f-17m", "vqa-1f-5m"]


@pytest.mark.parametrize("row_id", KINDS)
def test_a_real_run_reports_paper_vs_measured(tree, capsys, tmp_path, row_id):
    row = PAPER.rows[row_id]
    out_dir = tmp_path / "out"
    rc, out, err = run_cli([row_id, tree["text"], "--checkpoints", tree["ckpts"], "--data", tree["data"],
                            "--out", str(out_dir)], capsys)
    report = json.loads((out_dir / "reproduce.json").read_text())
    assert report["paper"] == dict(zip(row.metric.names, row.paper))
    if row.task == "ret":  # what the evaluation itself wrote, ITM re-ranked, named as the paper names it
        itm = json.loads((out_dir / "eval.json").read_text())[row.split.key]["itm"]
        assert report["measured"] == {n: round(itm[k], 2) for n, k in zip(row.metric.names, row.metric.keys)}
    elif row.task == "mc":
        mc = json.loads((out_dir / f"mc_{row.split.key}.json").read_text())
        assert report["measured"] == {"accuracy": round(mc["accuracy"], 2)}
    elif row.metric.source == "accuracy":
        qa = json.loads((out_dir / "eval_qa.json").read_text())[row.split.key]
        assert report["measured"] == {"accuracy": round(qa["accuracy"], 2)}
    if row.metric.source == "server":
        assert rc == 0 and report["measured"] == {} and (out_dir / "qa_test.json").is_file()
        assert report["verdict"].startswith(f"scored by the VQA server: submit {out_dir}/qa_test.json")
        return
    assert report["diff"] == {n: round(report["measured"][n] - p, 2) for n, p in report["paper"].items()}
    worst = max(report["diff"], key=lambda n: abs(report["diff"][n]))
    assert rc == 1
    assert report["verdict"] == f"differs: {worst} by {report['diff'][worst]:+.2f} points (tolerance 0.3)"
    # a tiny random model is far from the paper: the report says what usually explains it
    assert any("clips in the annotation" in c or "images in the annotation" in c or "questions" in c
               for c in report["checks"])
    first = row.metric.names[0]
    assert f"  {first:<12s} {row.paper[0]:7.2f} {report['measured'][first]:9.2f}" in out


def test_verdict_within_tolerance():
    row = PAPER.rows["msrvtt-ret-1f-5m"]
    p = reproduce.Plan(row, "ck.pth", "/data", row.split.config, [], "out", 0,
                       dict(entries=1000, present=1000, texts=1000))
    got = {"t2v R@1": 36.6, "t2v R@5": 66.2, "t2v R@10": 75.5}
    r = reproduce.compare(p, got, 0.3)
    assert r["verdict"] == "reproduced: every metric within 0.3 points of the paper" and r["checks"] == []
    assert r["diff"] == {"t2v R@1": -0.2, "t2v R@5": 0.3, "t2v R@10": 0.0}
    r = reproduce.compare(p, dict(got, **{"t2v R@1": 35.0}), 0.3)
    assert r["verdict"] == "differs: t2v R@1 by -1.80 points (tolerance 0.3)"
    assert r["checks"] == ["checkpoint ck.pth: 1-frame (no temporal encoder)",
                           "the split, frames (12) and the sampled media's resolution match the paper's; "
                           "compare the checkpoint with the archive's (msrvtt_ret)"]


def test_a_full_size_split_gives_no_size_line(tree, tmp_path, capsys):
    """1,000 entries with their clips present: no size warning (the sizes are checked, not assumed)."""
    data = tmp_path / "data"
    (data / "anno_downstream").mkdir(parents=True)
    media = data / "videos_images" / "msrvtt_2fps_224"
    media.mkdir(parents=True)
    clip = next(p for p in (tree["root"] / "data" / "videos_images" / "msrvtt_2fps_224").iterdir())
    entries = []
    for i in range(1000):
        os.symlink(os.path.realpath(clip), media / f"video{i}.mp4")
        entries.append({"video": f"video{i}.mp4", "caption": f"caption {i}"})
    (data / "anno_downstream" / "msrvtt_ret_test1k.json").write_text(json.dumps(entries))
    rc, out, err = run_cli(["msrvtt-ret-1f-5m", "--dry-run", "--checkpoints", tree["ckpts"], "--data",
                            str(data)], capsys)
    assert rc == 0
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: msrvtt-ret-1f-5m: {media}: shorter side 32 px in 5 sampled files, the original's "
        "msrvtt_2fps_224 is 224 px (singularity-ds preprocess videos SRC DST --preset msrvtt)",
        f"warning: msrvtt-ret-1f-5m: {media}: 8 fps in 5 sampled files, the original's msrvtt_2fps_224 is "
        "2 fps"]
    # a missing clip is named with the count
    os.remove(media / "video7.mp4")
    rc, out, err = run_cli(["msrvtt-ret-1f-5m", "--dry-run", "--checkpoints", tree["ckpts"], "--data",
                            str(data)], capsys)
    assert f"warning: msrvtt-ret-1f-5m: {media}: 1 of the split's 1,000 clips are missing" in err.splitlines()


def error_line(capsys, *args):
    rc = cli.main(["reproduce", *args])
    _, err = capsys.readouterr()
    assert rc == 2
    (line,) = err.strip().splitlines()
    return line.removeprefix("singularity-ds: error: ")


def test_what_is_missing_is_one_line(tree, tmp_path, capsys):
    ck, data = tree["ckpts"], tree["data"]
    base = ["--checkpoints", ck, "--data", data, "--dry-run"]
    assert error_line(capsys, "msrvtt-ret-1f-5m", "--checkpoints", ck, "--dry-run", "--data",
                      str(tmp_path / "none")) == f"--data {tmp_path / 'none'}: no such folder"
    # an archive not downloaded, then downloaded but not extracted
    empty = tmp_path / "ckpts"
    empty.mkdir()
    url = "https://vision.cs.unc.edu/jielei/project/sparse_bwd_data/release/ckpts/anet_qa.tar.gz"
    assert error_line(capsys, "anet-qa-1f-5m", "--checkpoints", str(empty), "--data", data, "--dry-run") == (
        f"anet-qa-1f-5m: no anet_qa/ folder in {empty}: download {url} and extract it there, or pass "
        "--checkpoint PATH")
    (empty / "anet_qa.tar.gz").write_bytes(b"")
    assert error_line(capsys, "anet-qa-1f-5m", "--checkpoints", str(empty), "--data", data, "--dry-run") == (
        f"anet-qa-1f-5m: {empty}/anet_qa.tar.gz is not extracted: tar -xzf {empty}/anet_qa.tar.gz -C {empty}")
    # names that do not say the variant
    odd = empty / "anet_qa"
    odd.mkdir()
    os.symlink(tree["single"]["qa"], odd / "model_a.pth")
    assert error_line(capsys, "anet-qa-1f-5m", "--checkpoints", str(empty), "--data", data, "--dry-run") == (
        f"anet-qa-1f-5m: none of the checkpoints in {odd} (model_a.pth) is named as the Singularity 5M one "
        "(1f-5m: 'temporal' or not, '5m'); pass --checkpoint PATH")
    # the wrong variant: a temporal checkpoint for a 1-frame row, and the reverse
    assert error_line(capsys, "msrvtt-ret-1f-5m", *base, "--checkpoint", tree["temporal"]["ret"]) == (
        f"msrvtt-ret-1f-5m: {tree['temporal']['ret']} has a 1-layer temporal encoder: it is a "
        "Singularity-temporal checkpoint, and the row is Singularity 5M; pass the 1-frame one (or the row "
        "msrvtt-ret-temporal-5m)")
    assert error_line(capsys, "anet-qa-temporal-17m", *base, "--checkpoint", tree["single"]["qa"]) == (
        f"anet-qa-temporal-17m: {tree['single']['qa']} has no temporal_vision_encoder.* weights: it is a "
        "1-frame Singularity checkpoint, and the row is Singularity-temporal 17M; pass the temporal one")
    assert error_line(capsys, "msrvtt-qa-1f-5m", *base, "--checkpoint", tree["single"]["ret"]) == (
        f"msrvtt-qa-1f-5m: {tree['single']['ret']} has no answer decoder (text_decoder.*): not a QA "
        "checkpoint; the msrvtt_qa archive holds the QA ones")
    # an annotation file or a media folder missing
    broken = tmp_path / "data"
    os.symlink(os.path.join(data, "videos_images"), tmp_path / "videos_images")
    (broken / "anno_downstream").mkdir(parents=True)
    os.symlink(tmp_path / "videos_images", broken / "videos_images")
    at_broken = ["--checkpoints", ck, "--data", str(broken), "--dry-run"]
    assert error_line(capsys, "didemo-ret-1f-5m", *at_broken) == (
        f"didemo-ret-1f-5m: {broken}/anno_downstream/didemo_ret_test.json is missing: it is "
        "didemo_ret_test.json of the released anno_downstream.tar.gz (https://vision.cs.unc.edu/jielei/project/"
        f"sparse_bwd_data/release/anno_downstream.tar.gz), extracted in {broken}")
    (broken / "anno_downstream" / "anet_ret_val_1.json").write_text("[]")
    os.rename(os.path.join(data, "videos_images", "activity_net_2fps_360"), tmp_path / "anet_away")
    try:
        assert error_line(capsys, "anet-ret-1f-5m", *at_broken) == (
            f"anet-ret-1f-5m: {broken}/videos_images/activity_net_2fps_360 is missing: ActivityNet v1.3 "
            "videos (activity-net.org/download.html), then singularity-ds preprocess videos SRC "
            f"{broken}/videos_images/activity_net_2fps_360 --preset anet")
    finally:
        os.rename(tmp_path / "anet_away", os.path.join(data, "videos_images", "activity_net_2fps_360"))
    assert error_line(capsys, "msrvtt-ret-9f-5m") == (
        "reproduce: no paper row 'msrvtt-ret-9f-5m' (close: msrvtt-ret-1f-5m, msrvtt-ret-1f-17m, "
        "msrvtt-ret-temporal-5m, msrvtt-ret-temporal-17m, msrvtt-zs-1f-5m, msrvtt-zs-1f-17m); "
        "`singularity-ds reproduce --list` lists them all")


def test_a_temporal_checkpoint_without_its_flags_is_one_line_in_eval(tree, tmp_path, capsys):
    """`eval` of a temporal checkpoint whose config lost the flags: the line names the flags to pass."""
    ckpt = torch.load(tree["temporal"]["ret"], map_location="cpu", weights_only=False)
    ckpt["config"]["temporal_vision_encoder"]["enable"] = False
    path = tmp_path / "temporal_noflags.pth"
    torch.save(ckpt, path)
    os.environ["SL_DATA_DIR"] = tree["data"]
    rc = cli.main(["eval", "ret", "ret_msrvtt", str(path), f"output_dir={tmp_path / 'ev'}"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.strip() == (
        f"singularity-ds: error: {path}: has a 1-layer temporal encoder (a Singularity-temporal checkpoint) "
        "but its config does not enable it: pass add_temporal_embed=True temporal_vision_encoder.enable=True "
        "temporal_vision_encoder.num_layers=1")
    # with the flags, as the original's README says, it evaluates
    rc = cli.main(["eval", "ret", "ret_msrvtt", str(path), f"output_dir={tmp_path / 'ev'}", tree["text"],
                   "add_temporal_embed=True", "temporal_vision_encoder.enable=True",
                   "temporal_vision_encoder.num_layers=1", "video_input.num_frames_test=2"])
    assert rc == 0
    assert re.search(r"^ITM re-ranked +2 \| ", capsys.readouterr().out, re.M)


def test_a_tokenizer_larger_than_the_text_tower_is_one_line(tree, tmp_path, capsys, monkeypatch):
    """The reference checkpoints' config names bert-base-uncased, their text tower has 512 words: `eval`
    (and `search`) would index past the embeddings; one line says to pass the tokenizer."""
    path = tree["single"]["ret"]
    monkeypatch.setenv("SL_DATA_DIR", tree["data"])
    rc = cli.main(["eval", "ret", "ret_msrvtt", path, f"output_dir={tmp_path / 'ev'}"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.strip() == (
        f"singularity-ds: error: tokenizer bert-base-uncased has 30522 words but the text tower of {path} "
        "has 512: pass the tokenizer it was trained with (text_encoder=FOLDER)")


def test_preprocess_preset_is_the_original_folder(tree, tmp_path):
    """--preset didemo: 2 fps, 360 px shorter side (the folder didemo_2fps_360_trimed30), no audio."""
    import av

    from singularity_ds.data.preprocess import main as preprocess
    src = tmp_path / "src"
    src.mkdir()
    clip = next((tree["root"] / "data" / "videos_images" / "didemo_2fps_360_trimed30").iterdir())
    os.symlink(os.path.realpath(clip), src / "a.mp4")
    assert preprocess(["videos", str(src), str(tmp_path / "dst"), "--preset", "didemo"]) == 0
    with av.open(str(tmp_path / "dst" / "a.mp4")) as c:
        s = c.streams.video[0]
        assert min(s.codec_context.width, s.codec_context.height) == 360 and s.average_rate == 2
        assert not c.streams.audio
    with pytest.raises(SystemExit):
        preprocess(["images", str(src), str(tmp_path / "dst2"), "--preset", "didemo"])


def test_the_docs_tables_are_the_registry():
    page = (Path(__file__).resolve().parents[1] / "docs" / "reproducing.md").read_text()
    marker = "<!-- generated from singularity_ds/paper.yaml"
    assert marker in page
    generated = page[page.index(marker):].split("\n", 1)[1]
    assert generated == reproduce.markdown(PAPER), "regenerate: the tables of docs/reproducing.md"
