"""A corpus gives the same training items whether it is read from its annotation file or from its tar
shards: the same captions, the same pixels, and the same ITC positives (items sharing an ``idx``)."""
import json
import shutil

import pytest
import torch

from singularity_ds.config import load_config
from singularity_ds.data import caption_train_datasets
from singularity_ds.data.loader import item_seed
from singularity_ds.data.shards import ShardStream, make_shards
from singularity_ds.data.synthetic import make_synthetic

SMALL = ["image_res=32", "batch_size.video=1", "batch_size.image=1", "num_workers=0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    make_synthetic(str(out), num_clips=36, size=32, frames=8, num_images=8, seed=3)
    return out


def file_items(ds, seed: int):
    """Every item in file order, each drawn from the seed its position has in an unshuffled epoch 0."""
    return [ds[(i, item_seed(seed, 0, i))] for i in range(len(ds))]


def shard_items(stream: ShardStream):
    """Every sample in shard order: unshuffled, position i is the file's entry i (no media is missing),
    so it gets the same item seed, hence the same frames, crop, flip and caption draw."""
    stream.shuffle = False
    stream.set_epoch(0)
    return list(stream)


def groups(items):
    """The ITC positives as a partition of item positions (the idx values themselves may differ)."""
    by_idx = {}
    for i, item in enumerate(items):
        by_idx.setdefault(item["idx"], []).append(i)
    return sorted(by_idx.values())


def assert_same_items(from_files, from_shards):
    assert len(from_files) == len(from_shards)
    assert [f["caption"] for f in from_files] == [s["caption"] for s in from_shards]
    assert all(torch.equal(f["media"], s["media"]) for f, s in zip(from_files, from_shards))
    assert groups(from_files) == groups(from_shards)


@pytest.mark.parametrize("multi_vision_gt", [False, True])
def test_synthetic_corpus_gives_the_same_items_and_positives(corpus, multi_vision_gt):
    """The synthetic pretraining corpora (video + image), switched with `train_corpus` as the demo does."""
    overlay = str(corpus / "configs" / "pretrain.yaml")
    extra = SMALL + [f"has_multi_vision_gt={multi_vision_gt}"]
    cfg = load_config(["pretrain", "tiny", overlay], extra + ["train_corpus=synthetic"])
    files = caption_train_datasets(cfg)
    shards = caption_train_datasets(load_config(["pretrain", "tiny", overlay],
                                        extra + ["train_corpus=synthetic_shards"]))
    assert sorted(files) == sorted(shards) == ["image", "video"]
    for media_type in ("video", "image"):
        assert isinstance(shards[media_type], ShardStream) and shards[media_type].seed == cfg.seed
        from_files, from_shards = file_items(files[media_type], cfg.seed), shard_items(shards[media_type])
        assert_same_items(from_files, from_shards)
        entries = json.load(open(corpus / "anno" / f"pretrain_{media_type}.json"))
        key = "caption" if multi_vision_gt else media_type  # one caption, several clips: one group
        expected = {}
        for i, e in enumerate(entries):
            expected.setdefault(e[key], []).append(i)
        assert groups(from_files) == sorted(expected.values())
        if media_type == "video":  # groups of several items: 2 captions per clip, or a motion caption
            # shared by several clips (as SSV2's templates)
            assert max(len(g) for g in expected.values()) == (5 if multi_vision_gt else 2)


# one caption repeated over media (0, 2), one media with several captions (0, 1), the same basename in
# another folder (3), a caption differing from 0's only in case and punctuation (3), caption lists (4, 5),
# and a video entry naming its file under `image`, as the original's README allows (4)
HAND_MADE = [{"video": "a.mp4", "caption": "A red square."},
             {"video": "a.mp4", "caption": "Something moves"},
             {"video": "b.mp4", "caption": "A red square."},
             {"video": "other/a.mp4", "caption": "a red square"},
             {"image": "c.mp4", "caption": ["First sentence.", "Second one!"]},
             {"video": "d.mp4", "caption": ["First sentence.", "Second one!"]},
             {"video": "c.mp4", "caption": "Something moves"}]


@pytest.mark.parametrize("paragraph", [False, True])
@pytest.mark.parametrize("multi_vision_gt", [False, True])
def test_hand_made_corpus_gives_the_same_items_and_positives(corpus, tmp_path, multi_vision_gt, paragraph):
    videos = tmp_path / "videos"
    (videos / "other").mkdir(parents=True)
    for name, clip in (("a", 0), ("b", 1), ("c", 2), ("d", 3), ("other/a", 4)):
        shutil.copyfile(corpus / "videos" / f"clip_{clip:05d}.mp4", videos / f"{name}.mp4")
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps(HAND_MADE))
    make_shards(str(anno), str(videos), str(tmp_path / "shards"), progress=False)
    extra = SMALL + [f"has_multi_vision_gt={multi_vision_gt}", f"is_paragraph_retrieval={paragraph}"]
    cfg = load_config(["pretrain", "tiny"], extra + [f"train_file=[[{anno},{videos},video]]"])
    files = caption_train_datasets(cfg)
    shard_corpus = f"train_file=[[{tmp_path / 'shards'},null,video]]"
    shards = caption_train_datasets(load_config(["pretrain", "tiny"], extra + [shard_corpus]))
    from_files, from_shards = file_items(files["video"], cfg.seed), shard_items(shards["video"])
    assert_same_items(from_files, from_shards)
    captions = [item["caption"] for item in from_files]
    # a paragraph is joined; otherwise one caption of the list is drawn from the item's seed (seed 42:
    # items 4 and 5 both draw the first)
    assert captions[4] == captions[5] == ("first sentence second one" if paragraph else "first sentence")
    assert captions[3] == captions[0] == "a red square"
    if multi_vision_gt:  # the caption text as the annotation has it: entry 3's differs from entry 0's
        assert groups(from_files) == [[0, 2], [1, 6], [3], [4, 5]]
    else:  # the media's basename
        assert groups(from_files) == [[0, 1, 3], [2], [4, 6], [5]]
