"""A generated video-text corpus that runs anywhere and needs time to solve.

Each clip is a coloured shape on a textured background. Two caption families:
- **appearance** ("a red square on a striped background"): one frame answers it;
- **motion / order** ("a red square moves from left to right", "a blue circle appears after a red
  square"): only several frames in order do. They name no background, so clips of one colour and shape
  on different backgrounds share a caption (retrieval with several ground-truth videos,
  ``has_multi_vision_gt``), and a test caption's hardest negatives are the clips of its own group: the
  same appearance in another motion or order. Motion clips are centred at mid-clip, and a group's two
  order clips show the same two shapes at the same places there (which appears first differs), so the
  middle frame alone cannot tell a group's clips apart -- the miniature of the original's SSV2 finding.

``make_synthetic(out_dir)`` writes H.264 MP4 clips (PyAV), a few still images, and annotations in the
original's formats (pretraining, retrieval train/val/test with ``appearance`` and ``motion`` test
splits, QA with an answer list, MC), plus config overlays (``configs/pretrain.yaml``, ``ret.yaml``,
``qa.yaml``, ``mc.yaml``) pointing at them, and the pretraining corpora as tar shards (``shards/``;
``train_corpus=synthetic_shards`` streams them). Seeded: the same arguments give the same files.
"""
import itertools
import os
import random

import numpy as np

from ..fileio import write_json

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ("square", "circle", "triangle")
BACKGROUNDS = ("striped", "checkered", "dotted", "plain")
DIRECTIONS = {"left to right": ((0.2, 0.5), (0.8, 0.5)), "right to left": ((0.8, 0.5), (0.2, 0.5)),
              "top to bottom": ((0.5, 0.2), (0.5, 0.8)), "bottom to top": ((0.5, 0.8), (0.5, 0.2))}
DIRECTION_ANSWER = {"left to right": "right", "right to left": "left",
                    "top to bottom": "down", "bottom to top": "up"}
SPLITS = ("train", "val", "test")
RADIUS = 0.2  # shape half-size, as a fraction of the frame


# ---------------------------------------------------------------------- drawing
def background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(90, 150, 3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[:size, :size]
    period = max(size // 8, 4)
    if kind == "striped":
        img[(xx // period) % 2 == 0] *= 0.6
    elif kind == "checkered":
        img[((xx // period) + (yy // period)) % 2 == 0] *= 0.6
    elif kind == "dotted":
        img[((xx % period - period // 2) ** 2 + (yy % period - period // 2) ** 2) < (period // 4) ** 2] *= 0.5
    return img


def draw(img: np.ndarray, shape: str, color, center, radius: float) -> None:
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size]
    cx, cy, r = center[0] * size, center[1] * size, radius * size
    if shape == "square":
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    elif shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
    else:  # triangle pointing up
        mask = (yy <= cy + r) & (yy >= cy - r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2)
    img[mask] = color


def render(clip: dict, size: int, frames: int) -> np.ndarray:
    # the background shade is shared by a group's clips, so their middle frames are identical
    bg = background(clip["background"], size, np.random.default_rng(clip.get("group_seed", clip["seed"])))
    out = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        t = f / (frames - 1)
        img = bg.copy()
        if clip["kind"] == "motion":
            (x0, y0), (x1, y1) = DIRECTIONS[clip["direction"]]
            draw(img, clip["shape"], COLORS[clip["color"]], (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t), RADIUS)
        else:  # order: first shape appears at 20% of the clip, second at 40% (both visible mid-clip);
            # the first one's side alternates within a group, so the side does not tell the order
            first, second = (0.28, 0.72) if clip.get("first_left", True) else (0.72, 0.28)
            if t >= 0.2:
                draw(img, clip["shape"], COLORS[clip["color"]], (first, 0.5), RADIUS)
            if t >= 0.4:
                draw(img, clip["shape2"], COLORS[clip["color2"]], (second, 0.5), RADIUS)
        out[f] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def write_clip(path: str, frames: np.ndarray, fps: int, codec: str = "libx264") -> None:
    import av
    tmp = path + ".part"
    # x264's assembly and threads give slightly different pixels in different processes (measured: 1 of
    # ~40 clips); without them the same seed makes the same corpus, and these clips are tiny
    options = {"libx264": {"crf": "18", "preset": "veryfast", "x264-params": "threads=1:no-asm=1"},
               "mjpeg": {"q:v": "2"}}.get(codec, {})
    with av.open(tmp, "w", format=os.path.splitext(path)[1][1:].replace("mkv", "matroska")) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = options
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- captions and questions
def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def appearance_caption(c):
    return f"{_a(c['color'])} {c['shape']} on a {c['background']} background"


def temporal_caption(c):
    if c["kind"] == "motion":
        return f"{_a(c['color'])} {c['shape']} moves from {c['direction']}"
    return f"{_a(c['color2'])} {c['shape2']} appears after {_a(c['color'])} {c['shape']}"


def questions(c):
    qs = [("what color is the " + c["shape"], c["color"], "appearance"),
          ("what is the background", c["background"], "appearance")]
    if c["kind"] == "motion":
        qs.append((f"which way does the {c['color']} {c['shape']} move",
                   DIRECTION_ANSWER[c["direction"]], "motion"))
    else:
        qs.append(("which shape appears first", c["shape"], "motion"))
    return qs


# ---------------------------------------------------------------------- corpus
def plan_clips(num_clips: int, seed: int, test_fraction: float = 0.15):
    """Clips come in groups that share appearance (colour, shape, background) and differ only in
    motion or order; ``test_fraction`` of the groups are the test split, then 10% validation. The
    first groups cover every colour and shape once before one repeats (on another background), so up
    to 18 test groups have no motion caption in common. Past 72 groups (every colour x shape x
    background once) the combinations come again, each on a new background shade: more training
    groups per colour and shape, so a model cannot tell shapes apart by their groups' backgrounds."""
    rng = random.Random(seed)
    every = list(itertools.product(COLORS, SHAPES, BACKGROUNDS))
    combos = every[:]
    rng.shuffle(combos)
    for repeat in range(1, -(-num_clips // (6 * len(every)))):
        # past 72 groups the combinations come again, each on a new background shade (the group seed):
        # their own generator, so a corpus that needs no repeat is the same as before repeats existed
        more = every[:]
        random.Random(seed * 7_919 + repeat).shuffle(more)
        combos += more
    rounds, seen = [], {}
    for combo in combos:  # the how-many-th time this colour and shape comes
        seen[combo[:2]] = seen.get(combo[:2], -1) + 1
        rounds.append(seen[combo[:2]])
    combos = [combos[i] for i in sorted(range(len(combos)), key=rounds.__getitem__)]  # stable
    clips = []
    for color, shape, bg in combos:
        for direction in DIRECTIONS:
            clips.append(dict(kind="motion", color=color, shape=shape, background=bg, direction=direction))
        others = [(c2, s2) for c2 in COLORS for s2 in SHAPES if s2 != shape]
        color2, shape2 = rng.choice(others)
        clips.append(dict(kind="order", color=color, shape=shape, color2=color2,
                          shape2=shape2, background=bg, first_left=True))
        clips.append(dict(kind="order", color=color2, shape=shape2, color2=color,
                          shape2=shape, background=bg, first_left=False))
        if len(clips) >= num_clips:
            break
    clips = clips[:num_clips]
    groups = [clips[i:i + 6] for i in range(0, len(clips), 6)]  # one appearance combination each
    if len(groups) < 3:
        raise ValueError(f"num_clips={num_clips}: need at least 18 clips (3 groups of 6) for train/val/test")
    n_test = max(1, round(len(groups) * test_fraction))
    n_val = max(1, round(len(groups) * 0.1))
    if n_test + n_val >= len(groups):
        raise ValueError(f"num_clips={num_clips}, test_fraction={test_fraction}: {n_test} test and {n_val} "
                         f"validation groups of {len(groups)} leave none for training")
    for i, group in enumerate(groups):
        split = "test" if i < n_test else "val" if i < n_test + n_val else "train"
        for c in group:
            c.update(split=split, group_seed=seed * 1_009 + i)
    for i, c in enumerate(clips):
        c.update(id=i, seed=seed * 100_003 + i, video=f"clip_{i:05d}.mp4")
    return clips


def _yaml(lines, path):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_synthetic(out_dir: str, num_clips: int = 300, size: int = 96, frames: int = 16, fps: int = 8,
                   num_images: int = 24, seed: int = 0, codec: str = "libx264", workers: int = 1,
                   shards: bool = True, test_fraction: float = 0.15) -> dict:
    out_dir = os.path.abspath(out_dir)
    vdir, idir, adir, cdir = (os.path.join(out_dir, d) for d in ("videos", "images", "anno", "configs"))
    for d in (vdir, idir, adir, cdir):
        os.makedirs(d, exist_ok=True)
    ext = {"libx264": ".mp4", "mjpeg": ".avi", "libvpx-vp9": ".webm"}.get(codec, ".mp4")
    clips = plan_clips(num_clips, seed, test_fraction)
    for c in clips:
        c["video"] = c["video"].replace(".mp4", ext)
    jobs = [(os.path.join(vdir, c["video"]), c, size, frames, fps, codec) for c in clips]
    if workers > 1:
        from multiprocessing import Pool
        with Pool(workers) as pool:
            pool.starmap(_render_and_write, jobs, chunksize=8)
    else:
        for job in jobs:
            _render_and_write(*job)

    from PIL import Image
    rng = random.Random(seed + 1)
    images = []
    for i in range(num_images):
        c = dict(kind="motion", color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES),
                 background=rng.choice(BACKGROUNDS), direction="left to right", seed=seed * 7 + i)
        name = f"image_{i:04d}.jpg"
        Image.fromarray(render(c, size, 2)[0]).save(os.path.join(idir, name), quality=95)
        images.append({"image": name, "caption": appearance_caption(c)})
    write_json(images, os.path.join(adir, "pretrain_image.json"))

    by_split = {s: [c for c in clips if c["split"] == s] for s in SPLITS}
    files = {}

    def anno(name, entries):
        files[name] = os.path.join(adir, name + ".json")
        write_json(entries, files[name])

    # pretraining and retrieval training: one entry per caption (both families)
    both = [{"video": c["video"], "caption": cap} for c in by_split["train"]
            for cap in (appearance_caption(c), temporal_caption(c))]
    anno("pretrain_video", both)
    anno("ret_train", both)
    # the motion/order captions alone: an appearance caption fits all six clips of its group, yet its
    # pairs with the other five (listed under their motion captions, another idx) count as negatives,
    # the very ones ITC's hard-negative sampler hands ITM; without them a fine-tuning learns motion
    anno("ret_train_motion", [{"video": c["video"], "caption": temporal_caption(c)}
                              for c in by_split["train"]])
    for split in ("val", "test"):
        # appearance: one clip per appearance combination, caption from one frame
        seen, app = set(), []
        for c in by_split[split]:
            key = (c["color"], c["shape"], c["background"])
            if c["kind"] == "motion" and key not in seen:
                seen.add(key)
                app.append({"video": c["video"], "caption": appearance_caption(c)})
        anno(f"ret_{split}_appearance", app)
        groups = {}
        for c in by_split[split]:
            groups.setdefault(temporal_caption(c), []).append(c["video"])
        anno(f"ret_{split}_motion", [{"video": videos, "caption": cap} for cap, videos in groups.items()])
    # QA
    answers = sorted({a for c in clips for _, a, _ in questions(c)})
    write_json(answers, os.path.join(adir, "qa_answers.json"))
    files["qa_answers"] = os.path.join(adir, "qa_answers.json")
    for split in SPLITS:
        anno(f"qa_{split}", [{"video": c["video"], "question": q, "answer": a,
                              "question_id": f"{c['id']}_{k}", "question_type": t}
                             for c in by_split[split] for k, (q, a, t) in enumerate(questions(c))])
    # MC: the right temporal caption among same-appearance distractors
    mc = []
    rng = random.Random(seed + 2)
    for c in by_split["test"]:
        right = temporal_caption(c)
        if c["kind"] == "motion":  # the same shape in the other directions, and another shape
            wrong = [temporal_caption(dict(c, direction=d)) for d in DIRECTIONS if d != c["direction"]]
            wrong.append(temporal_caption(dict(c, shape=rng.choice([s for s in SHAPES if s != c["shape"]]))))
        else:  # the reverse order, and other shapes
            wrong = [temporal_caption(dict(c, shape=c["shape2"], shape2=c["shape"]))]
            wrong += [temporal_caption(dict(c, shape=s1, shape2=s2)) for s1 in SHAPES for s2 in SHAPES
                      if s1 != s2 and {s1, s2} != {c["shape"], c["shape2"]}][:3]
        options = [right] + wrong
        rng.shuffle(options)
        mc.append({"video": c["video"], "caption": options, "answer": options.index(right)})
    anno("mc_test", mc)

    corpus = lambda name: f"['{files[name]}', '{vdir}', video]"  # noqa: E731
    shard_lines = []
    if shards:  # the pretraining corpora again as tar shards: `train_corpus=synthetic_shards` streams them
        from .shards import make_shards
        sdir = os.path.join(out_dir, "shards")
        make_shards(files["pretrain_video"], vdir, os.path.join(sdir, "video"), "20MB", "video",
                    overwrite=True, progress=False)
        make_shards(os.path.join(adir, "pretrain_image.json"), idir, os.path.join(sdir, "image"), "20MB",
                    "image", overwrite=True, progress=False)
        shard_lines = ["  synthetic_shards:",
                       f"    - ['{os.path.join(sdir, 'video', 'index.json')}', null, video]",
                       f"    - ['{os.path.join(sdir, 'image', 'index.json')}', null, image]"]
    _yaml(["# synthetic corpus overlay for `pretrain` (written by make-synthetic)",
           "available_corpus:",
           f"  synthetic_video: {corpus('pretrain_video')}",
           f"  synthetic_image: ['{os.path.join(adir, 'pretrain_image.json')}', '{idir}']",
           "  synthetic:",
           "    - ${available_corpus.synthetic_video}",
           "    - ${available_corpus.synthetic_image}",
           *shard_lines,
           "train_corpus: synthetic",
           # batches the corpus can fill (the packaged pretrain config's 128 images would need more)
           f"batch_size: {{image: {min(8, num_images)}, video: 16}}",
           "has_multi_vision_gt: True  # one caption, several clips (as SSV2): they share idx, "
           "never negatives",
           "test_file:",
           f"  appearance: {corpus('ret_test_appearance')}",
           f"  motion: {corpus('ret_test_motion')}"], os.path.join(cdir, "pretrain.yaml"))
    _yaml(["# synthetic corpus overlay for `ret_msrvtt`-style retrieval (written by make-synthetic)",
           f"train_file: {corpus('ret_train')}",
           "has_multi_vision_gt: True  # one caption, several clips (as SSV2): they share idx, "
           "never negatives",
           "test_types: [appearance, motion]",
           "test_file:",
           f"  appearance: {corpus('ret_test_appearance')}",
           f"  motion: {corpus('ret_test_motion')}",
           f"  val_appearance: {corpus('ret_val_appearance')}",
           f"  val_motion: {corpus('ret_val_motion')}"], os.path.join(cdir, "ret.yaml"))
    _yaml(["# on top of ret.yaml: retrieval training on the motion/order captions only (written by "
           "make-synthetic)", f"train_file: {corpus('ret_train_motion')}"],
          os.path.join(cdir, "ret_motion.yaml"))
    _yaml(["# synthetic corpus overlay for video QA (`qa_msrvtt`-style; written by make-synthetic)",
           f"train_file: {corpus('qa_train')}",
           f"answer_list: {files['qa_answers']}",
           "test_types: [test]",
           "test_file:",
           f"  val: {corpus('qa_val')}",
           f"  test: {corpus('qa_test')}"], os.path.join(cdir, "qa.yaml"))
    _yaml(["# synthetic corpus overlay for multiple choice (`ret_msrvtt_mc`-style; "
           "written by make-synthetic)",
           "test_types: [mc]",
           "test_file:",
           f"  mc: {corpus('mc_test')}"], os.path.join(cdir, "mc.yaml"))
    meta = dict(num_clips=len(clips), size=size, frames=frames, fps=fps, seed=seed, codec=codec,
                test_fraction=test_fraction,
                splits={s: len(v) for s, v in by_split.items()}, files=files, videos=vdir, images=idir)
    write_json(meta, os.path.join(out_dir, "synthetic.json"))
    return meta


def _render_and_write(path, clip, size, frames, fps, codec):
    write_clip(path, render(clip, size, frames), fps, codec)
