"""``singularity-ds bench stream``: the training loader from annotation files vs from tar shards, and
the host memory of a 10M-entry annotation list.

Not a test: it prints numbers for the docs and issue notes.

1. Corpus: ``--clips`` clips at ``--res`` px. Rendering and encoding 20k distinct clips would take an
   hour on 2 cores, so ``--distinct`` clips are rendered and copied to ``--clips`` separate files,
   each with its own annotation entry. The shards are written from that annotation file.
2. Loader: the same pretraining loader (1 frame, training transform, batch 32) over the annotation
   file + folder, then over the shards, each with 2 workers for ``--batches`` batches after one
   warm-up batch. Reported: samples/s and each worker's RSS and USS (psutil) at the end.
3. Annotations: ``--entries`` WebVid-like entries written to one JSON list, then loaded in a fresh
   process through ``load_corpus`` (the training path). Reported: that process's RSS before loading
   (Python + torch) and at its peak, the store's size, and the USS of 2 forked DataLoader workers
   after they have read every entry (``bench data``'s worker measurement).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from ..fileio import write_json


def build_corpus(root, clips, distinct, res, shard_size="256MB", workers=2):
    """``clips`` files (``distinct`` rendered clips, copied) with one annotation entry each, and their tar
    shards (``shard_size`` each: a loader with many workers needs many more shards than workers).
    -> (annotation file, media folder, shard folder). Reruns reuse what is there."""
    from .shards import make_shards
    from .synthetic import make_synthetic
    seed_dir = os.path.join(root, "seed")
    if not os.path.isfile(os.path.join(seed_dir, "synthetic.json")):
        make_synthetic(seed_dir, num_clips=distinct, size=res, frames=16, fps=8,
                       num_images=2, workers=workers, shards=False)
    entries = json.load(open(os.path.join(seed_dir, "anno", "pretrain_video.json")))
    videos = os.path.join(root, "videos")
    os.makedirs(videos, exist_ok=True)
    out = []
    for i in range(clips):
        e = entries[i % len(entries)]
        name = f"{i:06d}.mp4"
        if not os.path.exists(os.path.join(videos, name)):
            shutil.copyfile(os.path.join(seed_dir, "videos", e["video"]), os.path.join(videos, name))
        out.append(dict(e, video=name))
    anno = os.path.join(root, "anno.json")
    write_json(out, anno, indent=None)
    if not os.path.isfile(os.path.join(root, "shards", "index.json")):
        make_shards(anno, videos, os.path.join(root, "shards"), shard_size, overwrite=True)
    return anno, videos, os.path.join(root, "shards")


def time_loader(train_file, batches, workers, res):
    import psutil

    from ..config import load_config
    from .builders import caption_train_loader
    from .text import build_tokenizer
    cfg = load_config(["pretrain", "tiny"], [f"image_res={res}", "batch_size.video=32",
                                             f"num_workers={workers}", "video_input.num_frames=1",
                                             f"train_file={train_file}"])
    loader = caption_train_loader(cfg, build_tokenizer(), 0, 1)
    loader.set_epoch(0)
    it = iter(loader)
    next(it)  # warm-up: workers started, first batches decoded
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - start
    kids = psutil.Process().children(recursive=True)
    mem = [(p.memory_info().rss / 2 ** 20, p.memory_full_info().uss / 2 ** 20) for p in kids]
    del it
    return dict(samples_per_s=round(32 * batches / dt, 1),
                worker_rss_mib=[round(r) for r, _ in mem], worker_uss_mib=[round(u) for _, u in mem])


_LOAD = r"""
import json, resource, sys
import psutil
from singularity_ds.data.annotations import load_corpus
from singularity_ds.data.benchmark import worker_memory
base = psutil.Process().memory_info().rss / 2 ** 20  # the interpreter with torch imported
store = load_corpus([(sys.argv[1], "/data/webvid/videos", "video")])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
print(json.dumps(dict(entries=len(store), store_mib=store.nbytes / 2 ** 20, baseline_rss_mib=base,
                      peak_rss_mib=peak, rss_after_mib=psutil.Process().memory_info().rss / 2 ** 20,
                      worker_uss_mib=max(worker_memory(store)))))
"""


def annotation_memory(path, entries):
    if not os.path.isfile(path):
        # WebVid-like: a folder/id path and a caption of 6-14 random vocabulary words (random words
        # compress about as well as real captions; a repeated template would compress far better)
        import random

        from .text import build_tokenizer
        words = sorted(w for w in build_tokenizer().vocab if w.isalpha() and len(w) > 2)
        rng = random.Random(0)
        with open(path + ".tmp", "w") as f:
            f.write("[")
            for i in range(entries):
                f.write(("," if i else "") + json.dumps(
                    {"video": f"{i // 10000:04d}/{i:09d}.mp4",
                     "caption": " ".join(rng.choices(words, k=rng.randint(6, 14)))}))
            f.write("]")
        os.replace(path + ".tmp", path)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _LOAD, path], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(file_mib=round(os.path.getsize(path) / 2 ** 20), load_s=round(time.perf_counter() - start, 1))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="singularity-ds bench stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/sds-bench-stream",
                   help="work folder (kept: reruns reuse the corpus)")
    p.add_argument("--clips", type=int, default=20_000)
    p.add_argument("--distinct", type=int, default=200)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--entries", type=int, default=10_000_000, help="annotation entries (0: skip)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    os.makedirs(args.dir, exist_ok=True)
    anno, videos, shards = build_corpus(args.dir, args.clips, args.distinct, args.res)
    res = dict(clips=args.clips, res=args.res, workers=args.workers, batch=32)
    res["files"] = time_loader(f"[[{anno},{videos},video]]", args.batches, args.workers, args.res)
    print("annotation file + folder:", res["files"], flush=True)
    res["shards"] = time_loader(f"[[{shards},null,video]]", args.batches, args.workers, args.res)
    print("tar shards:              ", res["shards"], flush=True)
    if args.entries:
        res["annotations"] = annotation_memory(os.path.join(args.dir,
                                                            f"anno_{args.entries}.json"), args.entries)
        print("annotation store:", res["annotations"], flush=True)
    if args.json:
        write_json(res, args.json)
    return 0
