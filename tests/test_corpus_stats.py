"""`singularity-ds corpus-stats`: exact counts on the synthetic corpus with injected missing, broken and
duplicate entries, read from an annotation file (named in a config) and from its tar shards."""
import json
import shutil

import pytest

from singularity_ds.cli import main
from singularity_ds.data.shards import make_shards


def faulty_corpus(corpus, tmp_path):
    """11 entries over 6 distinct synthetic clips, with: an entry naming an earlier entry's clip (x2, one
    of them with a 40-token caption), a clip under a new name with an earlier caption (same bytes, same
    caption), a missing file, a file that is not a video."""
    meta = json.load(open(corpus / "synthetic.json"))
    clips = sorted({e["video"] for e in json.load(open(corpus / "anno" / "pretrain_video.json"))})[:6]
    media = tmp_path / "videos"
    media.mkdir()
    entries = []
    for i, clip in enumerate(clips):
        shutil.copy(corpus / "videos" / clip, media / f"c{i}.mp4")
        entries.append({"video": f"c{i}.mp4", "caption": f"clip number {i}"})
    shutil.copy(media / "c1.mp4", media / "copy.mp4")
    (media / "bad.mp4").write_bytes(b"<html>not a video</html>" * 20)
    entries += [{"video": "c0.mp4", "caption": "clip number zero again"},
                {"video": "copy.mp4", "caption": "clip number 1"},
                {"video": "gone.mp4", "caption": "a missing clip"},
                {"video": "bad.mp4", "caption": "a broken clip"},
                {"video": "c2.mp4", "caption": " ".join(["word"] * 40)}]
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps(entries))
    return anno, media, meta


def check_counts(s, meta, captions=11):
    assert (s["entries"], s["usable_entries"]) == (11, 9)
    assert (s["missing_media"], s["broken_media"]) == (1, 1)
    assert s["duplicates"] == dict(media_paths=2, captions=1, content=1)
    assert s["captions"] == captions and s["captions_truncated"] == 1 and s["caption_tokens"]["max"] == 40
    assert s["caption_tokens"]["min"] == 3  # "clip number 0"
    assert s["frames"]["min"] == s["frames"]["max"] == meta["frames"]
    assert s["duration_s"]["median"] == pytest.approx(meta["frames"] / meta["fps"])
    assert s["resolutions"][0][0] == f"{meta['size']}x{meta['size']}"
    assert s["caption_unit"] == "bert-base-uncased tokens without [CLS]"
    assert s["expected"] == 20 and s["missing_vs_expected_pct"] == 55.0


def test_corpus_stats_counts_a_faulty_corpus_as_annotation_and_as_shards(corpus, tmp_path, capsys):
    anno, media, meta = faulty_corpus(corpus, tmp_path)
    # the annotation file, declared as a corpus of a config (the way a train_corpus names it)
    overlay = tmp_path / "corpora.yaml"
    overlay.write_text(f"available_corpus:\n  mine: ['{anno}', '{media}', video]\n")
    assert main(["corpus-stats", "mine", "pretrain", str(overlay), "--expected", "20", "--workers", "0",
                 "--out", str(tmp_path / "files")]) == 0
    printed = capsys.readouterr().out
    assert "usable 9 of expected 20 (55.0% missing)" in printed
    assert "missing  " + str(media / "gone.mp4") in printed
    assert "broken   " + str(media / "bad.mp4") in printed
    files = json.load(open(tmp_path / "files" / "corpus_stats.json"))
    check_counts(files, meta)
    assert (tmp_path / "files" / "corpus_stats.png").stat().st_size > 10_000
    assert files["bytes"] == sum(p.stat().st_size for p in media.iterdir())  # each file read once

    # the same corpus as shards: make-shards leaves the missing entry out (listed in its index)
    make_shards(str(anno), str(media), str(tmp_path / "sh"), "20KB", progress=False)
    assert main(["corpus-stats", str(tmp_path / "sh" / "index.json"), "--expected", "20", "--workers", "1",
                 "--out", str(tmp_path / "shards")]) == 0
    shards = json.load(open(tmp_path / "shards" / "corpus_stats.json"))
    check_counts(shards, meta, captions=10)  # the missing entry's caption is not in the shards
    assert shards["missing_examples"] == [str(media / "gone.mp4")]
    assert "usable 9 of expected 20 (55.0% missing)" in capsys.readouterr().out


def test_corpus_stats_refuses_an_unknown_source_in_one_line(tmp_path, capsys):
    assert main(["corpus-stats", "nowhere_corpus", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("singularity-ds: error: nowhere_corpus: not a file, a shard corpus, or an "
                          "available_corpus name") and "\n" not in err
    (tmp_path / "a.json").write_text("[]")
    assert main(["corpus-stats", str(tmp_path / "a.json")]) == 2
    assert "needs --media-dir" in capsys.readouterr().err
    assert main(["corpus-stats", str(tmp_path / "a.json"), "--media-dir", str(tmp_path / "gone"),
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"singularity-ds: error: --media-dir {tmp_path / 'gone'}: no such "
                                       f"folder (the folder {tmp_path / 'a.json'}'s media paths are relative "
                                       "to)\n")
    assert not (tmp_path / "out").exists()
