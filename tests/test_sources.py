"""The field's own corpus layouts read by every command in the same forms: a folder of tars as img2dataset
and video2dataset write them (KEY.jpg / KEY.mp4, KEY.txt caption, KEY.json metadata, with NNNNN.parquet and
NNNNN_stats.json beside each tar, no index.json), given as the folder or as a glob, to `embed`,
`corpus-stats`, `doctor` and training. The layouts are written here as those tools write them (the tools
themselves pull in dependencies the lock does not carry)."""
import io
import json
import os
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from singularity_ds.cli import main
from test_search import FRAMES, built  # noqa: F401  (the module's index fixture)


def tool_layout(out, files, captions, ext):
    """``out/00000.tar`` (+ parquet, stats) in img2dataset / video2dataset's layout: keys 000000000..., a
    .txt caption and a .json of url, caption, key, status per sample."""
    out.mkdir(parents=True)
    rows = []
    with tarfile.open(out / "00000.tar", "w") as tar:
        for i, (path, caption) in enumerate(zip(files, captions)):
            key = f"{i:09d}"
            meta = dict(url=f"http://example.invalid/{i}.{ext}", caption=None, key=key, status="success",
                        error_message=None)
            for member, data in ((f"{key}.{ext}", path.read_bytes()), (f"{key}.txt", caption.encode()),
                                 (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            rows.append(dict(meta, caption=caption))
    # one URL the tool could not download: a parquet row, no sample (as both tools record it)
    rows.append(dict(url=f"http://example.invalid/gone.{ext}", caption="gone", key=f"{len(files):09d}",
                     status="failed_to_download", error_message="HTTP Error 404: Not Found"))
    pq.write_table(pa.Table.from_pylist(rows), out / "00000.parquet")
    (out / "00000_stats.json").write_text(json.dumps(dict(count=len(rows), successes=len(rows) - 1,
                                                          failed_to_download=1)))
    return out


@pytest.fixture
def layouts(corpus, tmp_path):
    videos = json.load(open(corpus / "anno" / "pretrain_video.json"))[:8]
    images = json.load(open(corpus / "anno" / "pretrain_image.json"))[:8]
    first = lambda c: c if isinstance(c, str) else c[0]  # noqa: E731
    return dict(
        video2dataset=(tool_layout(tmp_path / "v2d", [corpus / "videos" / e["video"] for e in videos],
                                   [first(e["caption"]) for e in videos], "mp4"), "video",
                       [first(e["caption"]) for e in videos]),
        img2dataset=(tool_layout(tmp_path / "i2d", [corpus / "images" / e["image"] for e in images],
                                 [first(e["caption"]) for e in images], "jpg"), "image",
                     [first(e["caption"]) for e in images]))


@pytest.mark.parametrize("tool", ["video2dataset", "img2dataset"])
@pytest.mark.parametrize("form", ["folder", "glob"])
def test_every_command_reads_the_fields_layout(corpus, built, layouts, tmp_path, capsys, tool, form):  # noqa: F811
    folder, media_type, captions = layouts[tool]
    source = str(folder) if form == "folder" else str(folder / "*.tar")
    # embed: one item per sample, its caption from KEY.txt, its type from its member
    idx = tmp_path / "idx"
    assert main(["embed", built["ckpt"], source, str(idx), "--frames", str(FRAMES)]) == 0, \
        capsys.readouterr().err[-2000:]
    from singularity_ds.search import Index
    index = Index.load(str(idx))
    assert [it["caption"] for it in index.items] == captions
    assert {it["media_type"] for it in index.items} == {media_type} and not index.broken
    assert [it["path"] for it in index.items] == [f"00000.tar#{i:09d}" for i in range(len(captions))]
    # corpus-stats: every sample usable, captions counted
    capsys.readouterr()
    assert main(["corpus-stats", source, "--out", str(tmp_path / "stats")]) == 0
    stats = json.load(open(tmp_path / "stats" / "corpus_stats.json"))
    # the tool's failed URL counts as an entry whose media is missing, named by its URL and status
    assert stats["entries"] == len(captions) + 1 and stats["usable_entries"] == len(captions), stats
    assert stats["missing_media"] == 1 and stats["missing_examples"] == [
        f"http://example.invalid/gone.{'mp4' if media_type == 'video' else 'jpg'} (failed_to_download: HTTP "
        "Error 404: Not Found)"]
    assert stats["captions"] == len(captions)
    assert stats["corpora"][0]["media_type"] == media_type  # found from the members: no index says it
    assert (stats["duration_s"] is None) == (media_type == "image"), stats["duration_s"]  # images: none
    # doctor and one training step, with the corpus as train_file
    overlay = tmp_path / "data.yaml"
    overlay.write_text(f"train_file: [['{source}', null, {media_type}]]\n")
    common = [str(overlay), "image_res=32", "batch_size.video=4", "batch_size.image=4", "num_workers=0"]
    assert main(["doctor", "pretrain", "tiny", *common, "--media-fraction", "1"]) == 0
    assert main(["train", "pretrain", "tiny", *common, "max_steps=1", f"output_dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "export").is_dir()


def test_a_jpeg_named_mp4_embeds_as_training_reads_it(corpus, built, tmp_path):  # noqa: F811
    """A JPEG with a video's extension: training, doctor and corpus-stats read it (through PyAV's
    fallback, as a one-frame video); embed reads it the same way instead of listing it broken."""
    from singularity_ds.search import Index
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(corpus / "videos" / "clip_00000.mp4", lib / "clip.mp4")
    shutil.copy(sorted((corpus / "images").iterdir())[0], lib / "photo.mp4")
    assert main(["embed", built["ckpt"], str(lib), str(tmp_path / "idx"), "--frames", str(FRAMES)]) == 0
    index = Index.load(str(tmp_path / "idx"))
    assert [it["path"] for it in index.items] == ["clip.mp4", "photo.mp4"] and not index.broken
    assert index.items[1]["frames"] == 1
    assert os.path.getsize(tmp_path / "idx" / "embeddings.npy") > 0


def test_tar_counts_come_from_the_tools_stats_files(layouts, monkeypatch):
    """A folder of the field's tars is counted from each NNNNN_stats.json ("successes") without reading the
    tar's headers; without the file (or with a damaged one), from the headers."""
    from singularity_ds.data import shards
    folder, _, captions = layouts["img2dataset"]
    real = shards._count_samples
    monkeypatch.setattr(shards, "_count_samples", lambda path: pytest.fail("headers read"))
    assert shards.shard_list(str(folder)) == [(str(folder / "00000.tar"), len(captions))]
    (folder / "00000_stats.json").write_text("{not json")
    monkeypatch.setattr(shards, "_count_samples", real)
    assert shards.shard_list(str(folder)) == [(str(folder / "00000.tar"), len(captions))]
