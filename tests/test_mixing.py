"""Weighted shard corpora (`train_corpus_weights`, `samples_per_epoch`): the epoch's draw, its split over
ranks and workers, replay on resume, the config checks, and a training run that uses the weights."""
import json
import logging
import os
import random
from collections import Counter

import pytest
import torch

from conftest import tiny_config
from singularity_ds.cli import main
from singularity_ds.data import caption_train_datasets
from singularity_ds.data.loader import epoch_seed
from singularity_ds.data.mixing import epoch_samples
from singularity_ds.data.shards import ShardStream, draw_shards, shard_list
from test_shards import keys_of, write_uneven_shards

A, B = [5] * 8, [10, 20, 30]  # corpus a: 8 shards of 5 samples (40); corpus b: 3 shards (60)


class CorpusStream(ShardStream):
    """The stream's split without decoding: items are (corpus folder, sample key)."""

    def _item(self, pos, sample):
        return dict(key=(os.path.basename(os.path.dirname(sample["__url__"])), sample["__key__"]))


def two_corpora(tmp_path):
    for name, counts in (("a", A), ("b", B)):
        (tmp_path / name).mkdir()
        write_uneven_shards(tmp_path / name, counts)
    return f"[[{tmp_path / 'a'},null,video],[{tmp_path / 'b'},null,video]]"


def weighted_streams(tmp_path, world, **keys):
    train_file = two_corpora(tmp_path)
    streams = []
    for rank in range(world):
        cfg = tiny_config(train_file=train_file, **{"batch_size.video": 3}, shard_shuffle_buffer=4, seed=7,
                          **keys)
        stream = caption_train_datasets(cfg, rank, world)["video"]
        stream.__class__ = CorpusStream
        streams.append(stream)
    return streams


def expected_draw(tmp_path, weights, samples, seed, epoch):
    """The documented rule, written out: shards drawn with replacement from random.Random(epoch_seed),
    each with probability proportional to its corpus's weight, until they hold `samples` (the last cut);
    -> the corpus of every position of the epoch."""
    shards = [(name, n, w) for name, counts, w in (("a", A, weights[0]), ("b", B, weights[1]))
              for n in counts if w > 0]
    rng, corpora = random.Random(epoch_seed(seed, epoch)), []
    while len(corpora) < samples:
        name, n, _ = rng.choices(shards, weights=[w for *_, w in shards])[0]
        corpora += [name] * min(n, samples - len(corpora))
    return corpora


def test_an_epoch_draws_each_corpus_exactly_the_seeded_share_over_ranks_and_workers(tmp_path):
    world, samples = 2, 50
    streams = weighted_streams(tmp_path, world, train_corpus_weights="[1,3]", samples_per_epoch=samples)
    per_rank = samples // world // 3 * 3  # whole batches of 3 per rank
    assert [len(s) for s in streams] == [per_rank] * world
    for epoch in (0, 1):
        seen = []
        for stream in streams:
            stream.set_epoch(epoch)
            batches = keys_of(stream, workers=2)
            assert len(batches) == per_rank // 3 and all(len(b) == 3 for b in batches)
            seen += [k for b in batches for k in b]
        corpora = expected_draw(tmp_path, [1, 3], samples, seed=7, epoch=epoch)
        used = [c for r in range(world) for c in corpora[r * (samples // world):][:per_rank]]
        assert Counter(c for c, _ in seen) == Counter(used)  # each corpus: exactly the draw's count
    # the share converges to weight x size / sum(weight x size): a = 1 x 40 / (1 x 40 + 3 x 60)
    shards = shard_list(str(tmp_path / "a")) + shard_list(str(tmp_path / "b"))
    weights = [1.0] * len(A) + [3.0] * len(B)
    draws = [draw_shards(shards, weights, 220, seed) for seed in range(400)]
    from_a = sum(n for d in draws for url, n in d if "/a/" in url)
    assert from_a / (220 * 400) == pytest.approx(40 / 220, abs=0.01)
    assert all(sum(n for _, n in d) == 220 for d in draws)


def test_resume_replays_the_remaining_weighted_samples_and_a_zero_weight_corpus_is_never_read(tmp_path):
    (stream,) = weighted_streams(tmp_path, 1, train_corpus_weights="[0,1]", samples_per_epoch=90)
    stream.set_epoch(3)
    full = keys_of(stream, workers=2)
    assert len(full) == 30 and {c for b in full for c, _ in b} == {"b"}
    assert len({k for b in full for k in b}) <= 60  # 90 samples of corpus b's 60: drawn with replacement
    assert keys_of(stream, workers=2) == full  # same seed and epoch: the same samples
    stream.skip = 7 * 3  # seven batches trained before the restart
    assert keys_of(stream, workers=2) == full[7:]
    stream.set_epoch(4)
    assert keys_of(stream, workers=2) != full


def test_the_epoch_splits_over_media_types_by_weighted_size():
    specs = [("v1", "", "video"), ("i1", "", "image"), ("v2", "", "video")]
    # weighted sizes: video 1 x 48 + 0 x 10 = 48, image 3 x 8 = 24 -> 40 samples: 26.67 / 13.33
    assert epoch_samples([1, 3, 0], specs, [48, 8, 10], 40) == dict(video=27, image=13)
    assert epoch_samples([1, 1, 1], specs, [48, 8, 10], None) == dict(video=58, image=8)  # the natural union
    assert epoch_samples([0, 1, 0], specs, [48, 8, 10], 5) == dict(video=0, image=5)


@pytest.mark.parametrize("override, message", [
    ("train_corpus_weights=[1]", "config key 'train_corpus_weights': 1 weight(s) for 2 train_file corpora; "
                                 "give one per corpus, in train_file's order"),
    ("train_corpus_weights=[1,-0.5]", "config key 'train_corpus_weights': element 1 must be >= 0, got -0.5"),
    ("train_corpus_weights=[0,0]", "config key 'train_corpus_weights': every weight is 0; at least one "
                                   "corpus must be drawn from"),
    ("samples_per_epoch=0", "config key 'samples_per_epoch' must be >= 1, got 0"),
])
def test_bad_weights_are_one_line_before_anything_is_written(corpus, tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["train", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"),
                 "train_corpus=synthetic_shards", override, f"output_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"singularity-ds: error: {message}"] and not out.exists()


def test_weights_over_annotation_files_are_refused(corpus, tmp_path, capsys):
    assert main(["train", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"),
                 "samples_per_epoch=8", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("singularity-ds: error: config key 'samples_per_epoch': train_file corpus 0 (")
    assert err.endswith("is an annotation file; weighted sampling streams shard corpora (write it with "
                        "make-shards)") and "\n" not in err


def test_doctor_counts_the_steps_of_the_weighted_epoch(corpus, capsys):
    """27 video + 13 image samples (see the training test below): 6 + 3 steps of 4; 12 + 2 unweighted."""
    args = ["doctor", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"),
            "train_corpus=synthetic_shards", "batch_size.video=4", "batch_size.image=4", "--world", "1"]
    assert main(args + ["train_corpus_weights=[1,3]", "samples_per_epoch=40"]) == 0
    assert "steps per epoch: 9 optimizer steps with 1 rank(s)" in capsys.readouterr().out
    assert main(args) == 0
    assert "steps per epoch: 14 optimizer steps with 1 rank(s)" in capsys.readouterr().out


@pytest.fixture
def one_rank_in_process(monkeypatch):
    """`singularity-ds train` inside this process: rank variables and logging handlers put back after."""
    from singularity_ds.dist import free_port
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.mark.slow  # three short training runs
def test_pretraining_uses_the_weights_and_a_resumed_run_replays_them(corpus, tmp_path, one_rank_in_process):
    """Video (48 samples) and image (8) shard corpora, weights [1, 3], 40 samples per epoch: 27 video and
    13 image samples (more than the image corpus holds), 6 video + 3 image steps of 4; unweighted it
    would be 12 + 2. Stopped after 4 steps and resumed, the run continues with the same losses."""
    def train(out, *extra):
        return main(["train", "pretrain", "tiny", str(corpus / "configs" / "pretrain.yaml"),
                     "train_corpus=synthetic_shards", "train_corpus_weights=[1,3]", "samples_per_epoch=40",
                     "image_res=32", "batch_size.video=4", "batch_size.image=4", "num_workers=0",
                     "scheduler.epochs=1", "log_freq=1", "ds_config=zero0", "precision=fp32", *extra,
                     f"output_dir={out}"])
    assert train(tmp_path / "full") == 0
    full = json.load(open(tmp_path / "full" / "history.json"))
    assert Counter(r["media"] for r in full) == dict(video=6, image=3)
    assert train(tmp_path / "cut", "max_steps=4", "save_every_steps=2") == 0
    assert train(tmp_path / "cut", "resume=auto") == 0
    resumed = json.load(open(tmp_path / "cut" / "history.json"))
    assert [(r["media"], r["loss"]) for r in resumed] == [(r["media"], r["loss"]) for r in full]
    # what a resume checks: the split and what the epoch is drawn from (other weights are refused)
    from singularity_ds.engine.checkpointing import Checkpointer
    checkpoints = Checkpointer(str(tmp_path / "cut"), 0)
    assert checkpoints.client_state(checkpoints.latest())["stream_layout"] == dict(
        world=1, num_workers=0, train_corpus_weights=[1.0, 3.0], samples_per_epoch=40)
    assert torch.isfinite(torch.tensor(full[-1]["loss"]))
