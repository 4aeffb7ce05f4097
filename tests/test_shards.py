"""Tar-shard corpora: make-shards round trip, the streaming split over ranks and workers, broken
samples, resume, pipe: URLs, and training from shards."""
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import tiny_config
from singularity_ds.cli import main
from singularity_ds.data import build_tokenizer, caption_train_loader
from singularity_ds.data.builders import caption_train_datasets
from singularity_ds.data.shards import ShardStream, make_shards, read_shard, shard_list
from singularity_ds.errors import AnnotationError


class KeyStream(ShardStream):
    """The split logic without decoding: items are the samples' keys and epoch positions."""

    def _item(self, pos, sample):
        return dict(key=sample["__key__"], pos=pos)


def write_uneven_shards(out, counts):
    """Shards with the given sample counts (keys 0..total-1), media = a few bytes, and their index."""
    shards, key = [], 0
    for s, n in enumerate(counts):
        url = f"s{s}.tar"
        with tarfile.open(out / url, "w") as tar:
            for _ in range(n):
                for ext, data in (("bin", b"x" * 10), ("json", json.dumps({"caption": f"c{key}"}).encode())):
                    info = tarfile.TarInfo(f"{key:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, fileobj=__import__("io").BytesIO(data))
                key += 1
        shards.append(dict(url=url, samples=n))
    (out / "index.json").write_text(json.dumps(dict(shards=shards)))
    return key


def keys_of(stream, workers):
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, collate_fn=list)
    batches = [[item["key"] for item in batch] for batch in loader]
    return batches


def test_make_shards_round_trips_every_field(corpus, tmp_path):
    anno = corpus / "anno" / "pretrain_video.json"
    entries = json.load(open(anno))
    assert main(["make-shards", str(anno), str(corpus / "videos"), str(tmp_path / "sh"),
                 "--shard-size", "40KB"]) == 0
    index = json.load(open(tmp_path / "sh" / "index.json"))
    assert index["annotation_sha256"] == hashlib.sha256(anno.read_bytes()).hexdigest()
    assert index["samples"] == len(entries) and len(index["shards"]) > 2 and not index["skipped"]
    samples = [s for url, n in shard_list(str(tmp_path / "sh")) for s in read_shard(url)]
    assert ([n for _, n in shard_list(str(tmp_path / "sh" / "index.json"))]
            == [s["samples"] for s in index["shards"]])
    assert len(samples) == len(entries)
    for i, (entry, sample) in enumerate(zip(entries, samples)):
        assert json.loads(sample["json"]) == entry and sample["__key__"] == f"{i:09d}"  # keyed by position
        assert sample["mp4"] == (corpus / "videos" / entry["video"]).read_bytes()
        # KEY.txt, the caption as img2dataset / OpenCLIP pipelines read it (several: one a line)
        caption = entry["caption"]
        assert sample["txt"].decode() == ("\n".join(caption) if isinstance(caption, list) else caption)
    # the same shards found by a glob (counted from the tar headers)
    assert sum(n for _, n in shard_list(str(tmp_path / "sh" / "shard-*.tar"))) == len(entries)
    # an existing corpus is not overwritten without --overwrite
    assert main(["make-shards", str(anno), str(corpus / "videos"), str(tmp_path / "sh")]) == 2


def test_make_shards_lists_missing_media_and_refuses_bad_entries(corpus, tmp_path):
    entries = json.load(open(corpus / "anno" / "pretrain_video.json"))[:5]
    entries[2] = dict(entries[2], video="gone.mp4")
    (tmp_path / "a.json").write_text(json.dumps(entries))
    index = make_shards(str(tmp_path / "a.json"), str(corpus / "videos"), str(tmp_path / "sh"),
                        progress=False)
    assert index["samples"] == 4 and [s["idx"] for s in index["skipped"]] == [2]
    del entries[3]["caption"]
    (tmp_path / "b.json").write_text(json.dumps(entries))
    with pytest.raises(AnnotationError, match=r"b.json: entry 3: missing key 'caption'"):
        make_shards(str(tmp_path / "b.json"), str(corpus / "videos"), str(tmp_path / "sh2"), progress=False)
    assert not (tmp_path / "sh2" / "index.json").exists()


@pytest.mark.parametrize("counts", [[7, 1, 12, 3, 9, 5, 2, 9], [7, 1, 12, 3, 9, 5, 2], [50]])
def test_two_ranks_two_workers_read_each_sample_once_with_equal_batches(tmp_path, counts):
    total = write_uneven_shards(tmp_path, counts)
    shards, bs, world = shard_list(str(tmp_path)), 3, 2
    seen, lengths = [], []
    for rank in range(world):
        stream = KeyStream(shards, None, bs, rank, world, seed=1, buffer=4)
        stream.set_epoch(2)
        batches = keys_of(stream, workers=2)
        assert all(len(b) == bs for b in batches) and len(batches) == len(stream) // bs
        lengths.append(len(batches))
        seen += [k for b in batches for k in b]
    per_rank = (total // world) // bs * bs
    assert lengths[0] == lengths[1] == per_rank // bs
    assert len(seen) == len(set(seen)) == world * per_rank  # each sample at most once, the tail waits
    assert total - len(seen) < world * bs + world
    if total % (world * bs) == 0:  # nothing left over: every sample exactly once
        assert sorted(seen) == [f"{k:06d}" for k in range(total)]


def test_a_shard_longer_than_its_index_count_keeps_the_split_equal(tmp_path):
    write_uneven_shards(tmp_path, [6, 6, 6, 6])
    index = json.load(open(tmp_path / "index.json"))
    index["shards"][0]["samples"] = 4  # the tar holds 6: positions must not spill into the next shard
    (tmp_path / "index.json").write_text(json.dumps(index))
    seen, lengths = [], []
    for rank in range(2):
        batches = keys_of(KeyStream(shard_list(str(tmp_path)), None, 2, rank, 2, seed=0, buffer=3), workers=2)
        lengths.append(len(batches))
        seen += [k for b in batches for k in b]
    assert lengths == [5, 5] and len(seen) == len(set(seen)) == 20


def test_shard_sources_are_recognised_and_media_types_checked(tmp_path):
    from singularity_ds.data.shards import is_shard_source
    write_uneven_shards(tmp_path, [2])
    assert is_shard_source(str(tmp_path)) and is_shard_source("a/shard-{000..009}.tar")
    assert is_shard_source("x/*.tar")
    assert not is_shard_source("anno/foo.targets.json") and not is_shard_source(str(tmp_path / "s0.tar.json"))
    index = json.load(open(tmp_path / "index.json"))
    (tmp_path / "index.json").write_text(json.dumps(dict(index, media_type="image")))
    with pytest.raises(AnnotationError, match="a shard corpus of image samples, declared as video"):
        shard_list(str(tmp_path), "video")


def test_epochs_shuffle_differently_and_resume_replays_the_same_batches(tmp_path):
    write_uneven_shards(tmp_path, [6, 9, 4, 11])
    shards = shard_list(str(tmp_path))
    stream = KeyStream(shards, None, 2, 0, 1, seed=0, buffer=5)
    first = keys_of(stream, workers=2)
    stream.set_epoch(1)
    second = keys_of(stream, workers=2)
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second))
    assert keys_of(stream, workers=2) == second  # the same (seed, epoch): the same batches
    stream.skip = 5 * 2  # five batches trained before the restart
    assert keys_of(stream, workers=2) == second[5:]


def test_broken_sample_is_skipped_counted_and_its_slot_filled(corpus, tmp_path):
    make_shards(str(corpus / "anno" / "pretrain_video.json"), str(corpus / "videos"), str(tmp_path / "sh"),
                shard_size="10MB", progress=False)
    with tarfile.open(tmp_path / "sh" / "shard-000000.tar") as tar:  # rewrite it with sample 3 corrupt
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tmp_path / "sh" / "shard-000000.tar", "w") as tar:
        for m, data in members:
            if m.name == "000000003.mp4":
                data = b"\x00garbage" * 40
                m.size = len(data)
            tar.addfile(m, fileobj=__import__("io").BytesIO(data))
    cfg = tiny_config(image_res=32, num_workers=2, **{"batch_size.video": 4},
                      train_file=f"[[{tmp_path / 'sh'},null,video]]")
    loader = caption_train_loader(cfg, build_tokenizer(), 0, 1)
    loader.set_epoch(0)
    batches = [b for _, b in loader]
    failures = [f for b in batches for f in b["failures"]]
    assert len(failures) == 1 and failures[0][0].endswith("shard-000000.tar#000000003")
    assert len(batches) == len(loader) and all(b["media"].shape == (4, 1, 3, 32, 32) for b in batches)


def test_shards_with_only_a_txt_caption_train(corpus, tmp_path):
    """Shards as img2dataset / video2dataset write them without a caption in KEY.json (KEY.mp4 + KEY.txt,
    in a folder of tars read through a glob): the caption comes from KEY.txt, the media from the one
    member that is neither text nor metadata."""
    entries = json.load(open(corpus / "anno" / "pretrain_video.json"))[:8]
    (tmp_path / "sh").mkdir()
    with tarfile.open(tmp_path / "sh" / "00000.tar", "w") as tar:
        for i, entry in enumerate(entries):
            caption = entry["caption"] if isinstance(entry["caption"], str) else entry["caption"][0]
            media = (corpus / "videos" / entry["video"]).read_bytes()
            for ext, data in (("txt", caption.encode()), ("mp4", media),
                              ("json", json.dumps({"key": f"{i:05d}", "status": "success"}).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, fileobj=__import__("io").BytesIO(data))
    cfg = tiny_config(image_res=32, num_workers=0, **{"batch_size.video": 4},
                      train_file=f"[[{tmp_path / 'sh' / '*.tar'},null,video]]")
    stream = caption_train_datasets(cfg)["video"]
    stream.set_epoch(0)
    assert isinstance(stream, ShardStream) and len(stream) == 8
    assert sorted(it["caption"] for it in stream) == sorted(
        e["caption"] if isinstance(e["caption"], str) else e["caption"][0] for e in entries)
    loader = caption_train_loader(cfg, build_tokenizer(), 0, 1)
    loader.set_epoch(0)
    batches = [b for _, b in loader]
    assert len(batches) == 2 and all(b["media"].shape == (4, 1, 3, 32, 32) for b in batches)
    assert not [f for b in batches for f in b["failures"]]


def test_pipe_urls_stream_through_a_command(tmp_path):
    total = write_uneven_shards(tmp_path, [4, 5])
    index = json.load(open(tmp_path / "index.json"))
    for s in index["shards"]:
        s["url"] = f"pipe:cat {tmp_path / s['url']}"
    (tmp_path / "remote.json").write_text(json.dumps(index))
    stream = KeyStream(shard_list(str(tmp_path / "remote.json")), None, 1, 0, 1, shuffle=False)
    assert [b[0] for b in keys_of(stream, workers=0)] == [f"{k:06d}" for k in range(total)]
    with pytest.raises(AnnotationError, match="need an index.json"):
        shard_list("pipe:cat x.tar")


@pytest.mark.slow  # two training runs in a subprocess
def test_pretraining_streams_the_synthetic_shards_with_one_config_switch(corpus, tmp_path, free_port):
    """`train_corpus=synthetic_shards`: video and image shards, a media type per step, 2 epochs."""
    out = tmp_path / "run"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "singularity_ds", "train", "pretrain", "tiny",
                           str(corpus / "configs" / "pretrain.yaml"), "train_corpus=synthetic_shards",
                           "image_res=32", "batch_size.video=4", "batch_size.image=4", "num_workers=2",
                           "scheduler.epochs=2", "log_freq=1", f"output_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = {m: json.load(open(corpus / "shards" / m / "index.json"))["samples"]
               for m in ("video", "image")}
    history = json.load(open(out / "history.json"))
    assert len(history) == 2 * sum(n // 4 for n in samples.values())
    assert torch.isfinite(torch.tensor(history[-1]["loss"]))
    assert "shards/image/index.json" in (out / "config.yaml").read_text()  # what the run read
    # the epoch's split depends on ranks x workers: a resume with other num_workers is refused
    proc = subprocess.run([sys.executable, "-m", "singularity_ds", "train", "pretrain", "tiny",
                           str(corpus / "configs" / "pretrain.yaml"), "train_corpus=synthetic_shards",
                           "image_res=32", "batch_size.video=4", "batch_size.image=4", "num_workers=1",
                           "scheduler.epochs=3", "resume=auto", f"output_dir={out}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "resume with the same ranks and num_workers" in proc.stderr, proc.stderr[-2000:]
