"""Damaged files the project wrote itself, read back: each file of an index folder and a shard corpus is
deleted, truncated and replaced with random bytes, then every command that reads it runs: each case is
one line naming the file and what to do, exit 2, and nothing in the folder is written or removed."""
import os
import shutil

import numpy as np
import pytest

from singularity_ds.cli import main
from test_search import FRAMES, built  # noqa: F401  (the module's index fixture)


def snapshot(folder):
    """{relative path: (size, mtime)} of every file below ``folder``."""
    return {os.path.relpath(os.path.join(d, f), folder): (os.path.getsize(os.path.join(d, f)),
                                                          os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(folder) for f in files}


def damage(path, how, rng):
    if how == "delete":
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    elif how == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    else:  # random bytes, of another length than the file's
        open(path, "wb").write(rng.integers(0, 256, 777, dtype=np.uint8).tobytes())


def one_line(capsys, code, rc=2) -> str:
    captured = capsys.readouterr()
    assert code == rc, captured.err[-2000:]
    # the only line besides a progress bar's (which redraws itself with \r, on stderr)
    lines = [line for line in captured.err.splitlines() if line.strip() and "\r" not in line
             and not line.startswith("embed:")]
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err[-2000:]
    line = lines[0].strip()
    assert line.startswith("singularity-ds: error: "), line
    return line


# file of the index -> the commands that read it (search --rerank reads the token features of parts/)
MERGED = ["meta.json", "items.parquet", "embeddings.npy"]
TOKENS = ["parts/00000/video_tokens.0.bin", "parts/00000/video_tokens.0.bin.json", "parts"]


CASES = [(name, how) for name in MERGED + TOKENS for how in ("delete", "truncate", "garbage")
         if name != "parts" or how == "delete"]  # a folder is only deleted


@pytest.mark.parametrize("name, how", CASES)
def test_damaged_index_file_is_one_line(built, tmp_path, capsys, name, how):  # noqa: F811
    idx = tmp_path / "idx"
    shutil.copytree(built["index"], idx)
    damage(idx / name, how, np.random.default_rng(len(name)))
    before = snapshot(idx)
    commands = [["search", str(idx), "a red square", "--rerank", "3"]]
    if name in MERGED:
        commands += [["search", str(idx), "a red square"], ["search", str(idx), "--like", "clip_00000.mp4"],
                     ["serve", str(idx), "--port", "9"]]  # refused before it listens
    for cmd in commands:
        line = one_line(capsys, main(cmd))
        if name == "meta.json" and how == "delete":
            assert "not a finished index (no meta.json)" in line
            continue
        file = idx / "parts" / "00000" if name == "parts" else idx / name  # the first part missing
        assert line.startswith(f"singularity-ds: error: {file}: damaged ("), line
        if name in TOKENS:
            part = idx / 'parts' / '00000'
            assert line.endswith(f"; delete {part} and run the same `singularity-ds embed` "
                                 "again (it embeds that part anew)"), line
        else:
            assert line.endswith("; run the same `singularity-ds embed` again to rebuild the index from its "
                                 f"parts, or delete {idx} and embed anew"), line
    assert snapshot(idx) == before  # nothing written or removed


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_broken_list_damaged_is_one_line(built, tmp_path, how):  # noqa: F811
    from singularity_ds.errors import ConfigError
    from singularity_ds.search import Index
    idx = tmp_path / "idx"
    shutil.copytree(built["index"], idx)
    (idx / "broken.jsonl").write_text('{"path": "a.mp4", "reason": "empty file"}\n')
    damage(idx / "broken.jsonl", how, np.random.default_rng(1))
    with pytest.raises(ConfigError, match="broken.jsonl: damaged"):
        Index.load(str(idx)).broken


def test_embed_again_rebuilds_damaged_merged_files_from_parts(corpus, built, tmp_path, capsys):  # noqa: F811
    """The fix the line names works: the same embed again re-merges from parts/ (no part is redone); a
    damaged part is refused until its folder is deleted, then embedded anew."""
    from singularity_ds.search import Index
    idx = tmp_path / "idx"
    shutil.copytree(built["index"], idx)
    args = ["embed", built["ckpt"], str(corpus / "videos"), str(idx), "--frames", str(FRAMES), "--tokens",
            "--dtype", "fp32", "--batch", "8", "--part-size", "16"]
    damage(idx / "embeddings.npy", "garbage", np.random.default_rng(0))
    damage(idx / "items.parquet", "truncate", np.random.default_rng(0))
    parts = {k: v for k, v in snapshot(idx).items() if k.startswith("parts/")}
    assert main(args) == 0
    assert {k: v for k, v in snapshot(idx).items() if k.startswith("parts/")} == parts
    whole, again = Index.load(str(built["index"])), Index.load(str(idx))
    assert np.array_equal(np.asarray(whole.embeddings), np.asarray(again.embeddings))
    assert again.items == whole.items
    capsys.readouterr()

    damage(idx / "parts" / "00001" / "rows.json", "garbage", np.random.default_rng(0))
    before = snapshot(idx)
    line = one_line(capsys, main(args))
    assert line.startswith(f"singularity-ds: error: {idx}/parts/00001/rows.json: damaged ("), line
    assert line.endswith(f"; delete {idx}/parts/00001 and run the same embed again (it embeds that part "
                         "anew)"), line
    assert snapshot(idx) == before
    shutil.rmtree(idx / "parts" / "00001")
    assert main(args) == 0
    assert np.allclose(np.asarray(Index.load(str(idx)).embeddings), np.asarray(whole.embeddings), atol=1e-6)


def test_embed_a_part_of_only_broken_files(corpus, built, tmp_path, capsys):  # noqa: F811
    """One broken image beside the videos is a part of its own (a part holds one media type) whose every
    file is broken: listed, never fatal, and the rerun is fine too."""
    from singularity_ds.search import Index
    lib = tmp_path / "lib"
    lib.mkdir()
    for name in ("clip_00000.mp4", "clip_00001.mp4"):
        shutil.copy(corpus / "videos" / name, lib / name)
    (lib / "broken.jpg").write_bytes(b"\x00not an image" * 20)
    args = ["embed", built["ckpt"], str(lib), str(tmp_path / "idx"), "--frames", str(FRAMES)]
    assert main(args) == 0
    index = Index.load(str(tmp_path / "idx"))
    assert [it["path"] for it in index.items] == ["clip_00000.mp4", "clip_00001.mp4"]
    assert [os.path.basename(b["path"]) for b in index.broken] == ["broken.jpg"]
    assert index.embeddings.shape[0] == 2
    assert main(args) == 0  # the rerun (every part done) merges the same index
    assert [it["path"] for it in Index.load(str(tmp_path / "idx")).items] == ["clip_00000.mp4",
                                                                              "clip_00001.mp4"]


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_tar_in_a_shard_glob_is_one_line(corpus, tmp_path, capsys, how):
    """A folder of tars as img2dataset / video2dataset write them, one of them damaged: corpus-stats and
    training name the tar."""
    shards = tmp_path / "shards"
    shutil.copytree(corpus / "shards" / "video", shards)
    tars = sorted(shards.glob("*.tar"))
    damage(tars[0], how, np.random.default_rng(3))
    before = snapshot(shards)
    line = one_line(capsys, main(["corpus-stats", str(shards / "*.tar")]))
    assert f"{tars[0]}: not a readable tar (" in line and line.endswith(
        "write it again (make-shards, or the tool that made it) or leave it out of the pattern"), line
    assert snapshot(shards) == before


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_damaged_shard_index_is_one_line_in_every_command(corpus, built, tmp_path, capsys, how):  # noqa: F811
    """make-shards' index.json cut short or overwritten: corpus-stats, doctor, training and embed each stop in
    one line naming it; nothing in the corpus folder changes."""
    shards = tmp_path / "shards"
    shutil.copytree(corpus / "shards" / "video", shards)
    damage(shards / "index.json", how, np.random.default_rng(4))
    before = snapshot(shards)
    overlay = tmp_path / "data.yaml"
    overlay.write_text(f"train_file: [['{shards}', null, video]]\n")
    train = [str(overlay), "image_res=32", "batch_size.video=4", "num_workers=0"]
    for cmd in (["corpus-stats", str(shards), "--out", str(tmp_path / "stats")],
                ["doctor", "pretrain", "tiny", *train],
                ["train", "pretrain", "tiny", *train, f"output_dir={tmp_path / 'run'}"],
                ["embed", built["ckpt"], str(shards), str(tmp_path / "idx")]):
        line = one_line(capsys, main(cmd))
        index = shards / "index.json"
        assert line.startswith(f"singularity-ds: error: {index}: not a shard index ("), (cmd, line)
        assert line.endswith("; write it again with make-shards"), line
    assert snapshot(shards) == before and not (tmp_path / "run").exists()
