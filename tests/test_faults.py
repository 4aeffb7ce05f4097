"""Issue 16: every bad input and fault ends in one clear line, and nothing is lost. Each test injects a
fault and checks the line a user sees (and what the run keeps). Sections by area."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from singularity_ds.cli import main
from singularity_ds.config import load_config
from singularity_ds.data import (CaptionDataset, MediaSource, build_tokenizer, build_transform,
                                 caption_train_loader, eval_datasets, load_corpus, make_loader)
from singularity_ds.data.annotations import read_annotations
from singularity_ds.data.loader import CaptionCollate
from singularity_ds.data.shards import ShardStream, make_shards, shard_list
from singularity_ds.data.synthetic import make_synthetic
from singularity_ds.errors import AnnotationError, ConfigError, MediaError
from singularity_ds.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =====================================================================================================
# Data layer and config loading: broken media in loader workers, annotation validation, YAML syntax
# errors, media paths outside the media folder.
# =====================================================================================================
def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def _garbage_corpus(tmp_path, names, entries_per_file=2):
    """A video corpus whose every file is garbage: (annotation file, media folder)."""
    media = tmp_path / "garbage"
    media.mkdir()
    for name in names:
        (media / name).write_bytes(b"not a video" * 10)
    anno = _write(tmp_path / "garbage.json", [{"video": n, "caption": f"caption {i} of {n}"}
                                              for n in names for i in range(entries_per_file)])
    return anno, str(media)


def _worker_error(dataset, num_workers):
    loader = make_loader(dataset, 2, CaptionCollate(build_tokenizer(), 16), num_workers=num_workers)
    with pytest.raises(MediaError) as raised:
        next(iter(loader))
    return raised.value


def test_broken_media_in_a_loader_worker_is_the_same_one_line_error(tmp_path):
    """Before: ``RuntimeError: Caught MediaError in DataLoader worker process 0.`` + the worker's traceback
    (MediaError(path, reason) could not be rebuilt from the traceback text); now the MediaError itself."""
    anno, media = _garbage_corpus(tmp_path, [f"v{i}.mp4" for i in range(4)])

    def dataset():
        return CaptionDataset(load_corpus([(anno, media, "video")]),
                              MediaSource("video", build_transform(32), 2), num_tries=3)
    in_process, in_worker = _worker_error(dataset(), 0), _worker_error(dataset(), 2)
    assert str(in_worker) == str(in_process) and "\n" not in str(in_worker)
    paths = in_worker.path.split(", ")
    assert len(paths) == 3 and all(os.path.dirname(p) == media for p in paths)
    assert "3 broken media in a row for one training item" in in_worker.reason
    assert in_worker.reason.endswith("check them, or raise media_retries")


def test_shard_stream_error_in_a_loader_worker_arrives_whole(tmp_path):
    """A worker whose whole part of a shard corpus is broken: the MediaError naming the shards, not a
    RuntimeError with a traceback."""
    anno, media = _garbage_corpus(tmp_path, [f"v{i}.mp4" for i in range(4)], entries_per_file=1)
    make_shards(anno, media, str(tmp_path / "shards"), progress=False)
    stream = ShardStream(shard_list(str(tmp_path / "shards" / "index.json"), "video"),
                         MediaSource("video", build_transform(32), 2), batch_size=2)
    loader = make_loader(stream, 2, CaptionCollate(build_tokenizer(), 16), num_workers=1)
    with pytest.raises(MediaError, match=r"shard-000000.tar: no sample of this worker's part \(4 samples\)"):
        next(iter(loader))


class CountingSource:
    """A media source that reads nothing: files named in ``broken`` fail, the others give a tensor made
    from the path's number and the seed (so two items are equal iff they used the same file and seed)."""
    media_type = "video"

    def __init__(self, broken):
        self.broken, self.reads = set(broken), []

    def __call__(self, path, seed):
        self.reads.append(os.path.basename(path))
        if os.path.basename(path) in self.broken:
            raise MediaError(path, "garbage")
        return torch.tensor([[float(os.path.basename(path)[1:-4]), float(seed)]])


def test_known_broken_files_are_never_read_again_nor_drawn_as_replacements(tmp_path):
    """Before: a broken file was read again every time its entry or a replacement draw met it, and each
    of those reads used up a try. Now it is read once per process, and an item comes out the same as
    from a process that knew nothing (resumed run, other num_workers)."""
    names = [f"v{i}.mp4" for i in range(12)]
    broken = set(names[:8])  # two thirds of the corpus
    anno = _write(tmp_path / "a.json", [{"video": n, "caption": f"c {n} {i}"}
                                        for n in names for i in range(2)])
    store = load_corpus([(anno, str(tmp_path), "video")])
    source = CountingSource(broken)
    warm = CaptionDataset(store, source, num_tries=30)
    items = [(i, 1000 + 7 * i) for i in range(len(store))] * 2  # every entry, twice
    failures, replaced_own = [], 0
    for index, seed in items:
        got = warm[(index, seed)]
        fresh = CaptionDataset(store, CountingSource(broken), num_tries=30)[(index, seed)]
        assert torch.equal(got["media"], fresh["media"]) and got["caption"] == fresh["caption"], index
        assert f"v{int(got['media'][0, 0])}.mp4" not in broken  # the file it was read from
        if os.path.basename(store[index]["media"]) in broken:  # its own file comes first in its failures
            replaced_own += got["failures"][0][0] == store[index]["media"]
        failures += got["failures"]
    assert sorted(n for n in source.reads if n in broken) == sorted(broken)  # each broken file read once
    assert {os.path.basename(p) for p, _ in failures} == broken
    assert replaced_own == 2 * 16  # the 16 entries of broken files, each time they came


def test_a_corpus_whose_every_file_is_known_broken_stops_with_one_line(tmp_path):
    anno = _write(tmp_path / "a.json", [{"video": f"v{i}.mp4", "caption": "c"} for i in range(3)])
    ds = CaptionDataset(load_corpus([(anno, str(tmp_path), "video")]),
                        CountingSource({"v0.mp4", "v1.mp4", "v2.mp4"}), num_tries=3)
    with pytest.raises(MediaError, match="3 broken media in a row"):
        ds[(0, 1)]
    with pytest.raises(MediaError, match=r"1000 replacement draws for one training item landed on files "
                                         r"this loader found broken \(3 files so far, in a corpus of 3 entries\)"):
        ds[(1, 1)]
    assert len(ds.source.reads) == 3  # the second item read nothing


def _train(tmp_path, out, *args):
    cmd = [sys.executable, "-m", "singularity_ds", "train", "pretrain", "tiny", "image_res=32",
           "batch_size.video=4", "log_freq=1", "max_steps=3", "num_workers=2", f"output_dir={out}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, SL_DATA_DIR=str(tmp_path), PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_train_with_broken_media_in_workers(tmp_path):
    """``singularity-ds train`` with num_workers=2: files that stay broken end the run in the one line
    (also in train.log); a few broken files are replaced and the summary names each of them."""
    make_synthetic(str(tmp_path / "c"), num_clips=18, size=32, frames=8, num_images=4, seed=2, shards=False)
    anno = tmp_path / "c" / "anno" / "pretrain_video.json"
    names = sorted({e["video"] for e in json.loads(anno.read_text())})
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for n in names:
        (garbage / n).write_bytes(b"not a video" * 10)
    proc = _train(tmp_path, tmp_path / "dead", f"train_file=[{anno},{garbage},video]")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("singularity-ds: error: ")
    assert "3 broken media in a row for one training item" in last
    named = last[len("singularity-ds: error: "):].split(": ")[0].split(", ")
    assert len(named) == 3 and {os.path.dirname(p) for p in named} == {str(garbage)}
    log = (tmp_path / "dead" / "train.log").read_text().strip().splitlines()[-1]
    assert log.endswith("ERROR singularity_ds.train: " + last[len("singularity-ds: error: "):])

    some = tmp_path / "some"
    shutil.copytree(tmp_path / "c" / "videos", some)
    for n in names[:2]:
        (some / n).write_bytes(b"not a video" * 10)
    proc = _train(tmp_path, tmp_path / "ok", f"train_file=[{anno},{some},video]", "media_retries=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [line for line in (tmp_path / "ok" / "train.log").read_text().splitlines()
               if "broken media were replaced during training" in line]
    assert len(summary) == 1, summary
    assert set(summary[0].split("(2 files): ")[1].split(", ")) == {str(some / n) for n in names[:2]}, summary
    entries = sum(e["video"] in names[:2] for e in json.loads(anno.read_text()))
    # one epoch (3 steps of 4 = all 12 entries): each entry of a broken file replaced at least once
    assert int(summary[0].split("WARNING singularity_ds.train: ")[1].split()[0]) >= entries


def test_bad_annotation_entries_are_refused_naming_file_entry_and_key(tmp_path):
    """Before: ``StopIteration`` (empty list), ``'int' object has no attribute 'lower'`` / ``unhashable
    type: 'list'`` (ints in a caption list), ``join() argument must be str`` (an int in a video list),
    each after training had started."""
    cases = [
        ([], r"empty.json: no entries \(an empty list\); a corpus needs at least one"),
        ([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4", "caption": [1, 2]}],
         r"ints.json: entry 1: key 'caption' must be a non-empty list of strings, got a list holding int 1"),
        ([{"video": "a.mp4", "caption": [["x"]]}],
         r"nested.json: entry 0: key 'caption' must be a non-empty list of strings, got a list holding list"),
        ([{"video": ["a.mp4", 3], "caption": "x"}],
         r"vint.json: entry 0: key 'video' must be a non-empty list of strings, got a list holding int 3"),
        ([{"video": [], "caption": "x"}],
         r"vempty.json: entry 0: key 'video' must be a non-empty list of strings, got an empty list"),
        ([{"video": "", "caption": "x"}], r"vblank.json: entry 0: key 'video': empty media path"),
    ]
    for entries, message in cases:
        name = message.split(".json")[0]
        with pytest.raises(AnnotationError, match=message):
            read_annotations(_write(tmp_path / f"{name}.json", entries), str(tmp_path), "video")


def test_too_few_entries_for_one_batch_is_refused(tmp_path):
    """Before: ``StopIteration`` at the first step (drop_last leaves the loader empty)."""
    anno = _write(tmp_path / "few.json", [{"video": f"v{i}.mp4", "caption": "x"} for i in range(3)])
    cfg = load_config(["pretrain", "tiny"], [f"train_file=[{anno},{tmp_path},video]", "batch_size.video=4"])
    message = r"few.json: 3 entries make no whole batch of batch_size.video=4 per rank \(1 rank\(s\)\)"
    with pytest.raises(AnnotationError, match=message):
        caption_train_loader(cfg, build_tokenizer(), num_workers=0)


def test_frame_counts_out_of_range_are_refused_by_train(capsys):
    for key, value in (("video_input.num_frames", 0), ("video_input.num_frames", -2),
                       ("video_input.num_frames_test", -1)):
        assert main(["train", "pretrain", "tiny", f"{key}={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"singularity-ds: error: config key '{key}' must be >= 1, got {value}", err


def test_an_empty_evaluation_set_is_refused_before_training(tmp_path):
    """Before: the run trained, then its first evaluation died with ``'NoneType' object has no attribute
    'shape'``. Now the task checks its evaluation sets first (the trainer asks before building anything)."""
    empty = _write(tmp_path / "empty_test.json", [])
    cfg = load_config(["ret_msrvtt", "tiny"], [f"test_file={{empty: [{empty}, {tmp_path}, video]}}",
                                               "test_types=[empty]"])
    with pytest.raises(AnnotationError, match=r"empty_test.json: no entries"):
        TASKS["train_ret"].check_evaluation_data(cfg)
    TASKS["pretrain"].check_evaluation_data(cfg)  # pretraining does not evaluate: nothing read
    qa = load_config(["qa_msrvtt", "tiny"], [f"test_file={{empty: [{empty}, {tmp_path}, video]}}",
                                             "test_types=[empty]"])
    with pytest.raises(AnnotationError, match=r"empty_test.json: no entries"):
        TASKS["train_qa"].check_evaluation_data(qa)


@pytest.mark.parametrize("text, where", [
    ("a: 1\nb: [1, 2\nc: 3\n",
     r"line 3 column 2: did not find expected ',' or '\]' "
     r"\(while parsing a flow sequence at line 2 column 4\)"),
    ("seed: 1\n\tbatch_size: 2\n", r"line 2 column 1: found a tab character that violates indentation"),
    ("seed: 1\nseed: 2\n", r"line 2 column 1: found duplicate key seed"),
    ("seed: 1\noutput_dir: ${oc.env:X\n", r"line 2 column 13: key output_dir: "),
    ("seed: 1\noutput_dir: caf\xe9\n".encode("latin-1"), r"line 2 column 16: not UTF-8"),
])
def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path, text, where):
    """Before: PyYAML's several-line message (the position in its middle), or none (a bad byte, a bad
    interpolation); now one line with the file, line and column."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=f"config file {path}: invalid YAML at {where}") as raised:
        load_config(["pretrain", str(path)])
    assert "\n" not in str(raised.value)


def test_media_paths_outside_the_media_folder(tmp_path):
    """Before: ``../`` and absolute paths were joined silently and read files outside the media folder.
    Now refused naming the file, entry and key, unless media_outside_dir=True (then read as written)."""
    media = tmp_path / "media"
    media.mkdir()
    inside = [{"video": "a/../b.mp4", "caption": "x"}, {"video": str(media / "c.mp4"), "caption": "y"}]
    entries = read_annotations(_write(tmp_path / "in.json", inside), str(media), "video")
    assert [e["media"] for e in entries] == [str(media / "a/../b.mp4"), str(media / "c.mp4")]
    for name, path in (("up", "../x.mp4"), ("deep", "a/../../x.mp4"), ("abs", "/elsewhere/x.mp4"),
                       ("sibling", str(tmp_path / "media2" / "x.mp4"))):
        anno = _write(tmp_path / f"{name}.json", [{"video": "ok.mp4", "caption": "x"},
                                                   {"video": ["ok.mp4", path], "caption": "y"}])
        with pytest.raises(AnnotationError, match=rf"{name}.json: entry 1: key 'video': media path '{path}' "
                                                  rf"is outside the media folder '{media}'; "
                                                  rf".*media_outside_dir=True"):
            read_annotations(anno, str(media), "video")
        entries = read_annotations(anno, str(media), "video", media_outside_dir=True)
        assert entries[1]["media"] == [str(media / "ok.mp4"), os.path.join(str(media), path)]
    # the config key, through the builders (evaluation sets here), and make-shards' flag
    anno = str(tmp_path / "up.json")
    cfg = load_config(["ret_msrvtt", "tiny"], [f"test_file={{t: [{anno}, {media}, video]}}",
                                               "test_types=[t]"])
    with pytest.raises(AnnotationError, match="up.json: entry 1: key 'video'"):
        eval_datasets(cfg)
    cfg.media_outside_dir = True
    assert eval_datasets(cfg)["t"].media == [str(media / "ok.mp4"), str(media / "ok.mp4")]
    with pytest.raises(AnnotationError, match="up.json: entry 1: key 'video'"):
        make_shards(anno, str(media), str(tmp_path / "shards"), progress=False)
