"""``singularity-ds bench data``: decode throughput (decord vs PyAV) and per-worker annotation memory.

Not a test: it prints numbers for the docs and issue notes. Decoding: clips/s and ms/clip for reading
T frames (``rand`` sampling) + the training transform at ``--res`` px, one process. Memory: unique
memory (USS) of each of 2 DataLoader workers after they have read every entry of an N-entry annotation
list, kept as Python dicts (the original) vs in :class:`AnnotationStore`.
"""
import argparse
import os
import random
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .annotations import AnnotationStore
from .readers import get_reader, read_frames
from .synthetic import make_synthetic
from .transforms import build_transform


def decode_benchmark(video_dir, frames_list=(1, 4), readers=("decord", "av"), res=224, limit=64):
    paths = sorted(os.path.join(video_dir, f) for f in os.listdir(video_dir))[:limit]
    transform = build_transform(res, train=True)
    rows = []
    for reader_name in readers:
        reader = get_reader(reader_name)
        for t in frames_list:
            read_frames(paths[0], t, "rand", reader)  # warm-up
            start = time.perf_counter()
            for i, p in enumerate(paths):
                frames, _, _ = read_frames(p, t, "rand", reader, random.Random(i))
                transform(frames)
            dt = time.perf_counter() - start
            rows.append(dict(reader=reader_name, frames=t, clips_per_s=len(paths) / dt,
                             ms_per_clip=1000 * dt / len(paths)))
    return rows


class _Touch(Dataset):
    def __init__(self, entries):
        self.entries = entries

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        n = len(self.entries[i]["caption"])
        uss = 0
        if i % 20_000 == 0 or i == len(self) - 1:
            import psutil
            uss = psutil.Process().memory_full_info().uss
        return n, uss, get_worker_info().id


def worker_memory(entries, workers=2):
    peak = {}
    loader = DataLoader(_Touch(entries), batch_size=4096, num_workers=workers, collate_fn=lambda b: b)
    for batch in loader:
        for _, uss, worker in batch:
            peak[worker] = max(peak.get(worker, 0), uss)
    return [peak[w] / 2 ** 20 for w in sorted(peak)]


def memory_benchmark(n=1_000_000, workers=2):
    entries = [{"video": f"videos/{i:08d}.mp4", "caption": f"a person does thing number {i} in a room"}
               for i in range(n)]
    as_list = worker_memory(entries, workers)
    store = AnnotationStore(entries)
    del entries
    as_store = worker_memory(store, workers)
    return dict(entries=n, store_mib=store.nbytes / 2 ** 20, list_worker_uss_mib=as_list,
                store_worker_uss_mib=as_store)


def main(argv=None):
    p = argparse.ArgumentParser(prog="singularity-ds bench data", description=__doc__)
    p.add_argument("--corpus", help="existing synthetic corpus folder (default: generate one at --res px)")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--entries", type=int, default=1_000_000,
                   help="annotation entries for the memory test (0: skip)")
    p.add_argument("--codec", default="libx264", choices=["libx264", "mjpeg", "libvpx-vp9"],
                   help="codec of the generated corpus (DALI's CPU decoder reads MJPEG / VP9, not H.264)")
    p.add_argument("--readers", default="decord,av", help="comma-separated: decord, av, dali")
    p.add_argument("--frames", default="1,4", help="comma-separated frames per clip")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    corpus = args.corpus or tempfile.mkdtemp(prefix="sds-bench-")
    if not args.corpus:
        make_synthetic(corpus, num_clips=max(args.clips, 18), size=args.res, frames=32, fps=8, num_images=2,
                       workers=2, codec=args.codec)
    print(f"decode + train transform, {args.res} px, {args.clips} clips of 32 frames ({args.codec}), "
          f"1 process:")
    print(f"{'reader':8s} {'frames':>6s} {'clips/s':>9s} {'ms/clip':>9s}")
    frames = tuple(int(x) for x in args.frames.split(","))
    for r in decode_benchmark(os.path.join(corpus, "videos"), frames_list=frames,
                              readers=args.readers.split(","), res=args.res, limit=args.clips):
        print(f"{r['reader']:8s} {r['frames']:6d} {r['clips_per_s']:9.1f} {r['ms_per_clip']:9.2f}")
    if not args.entries:
        return 0
    m = memory_benchmark(args.entries)
    print(f"\nannotations: {m['entries']:,} entries; store {m['store_mib']:.0f} MiB")
    print("worker USS after reading every entry, MiB: list of dicts "
          + ", ".join(f"{x:.0f}" for x in m["list_worker_uss_mib"]) + "; AnnotationStore "
          + ", ".join(f"{x:.0f}" for x in m["store_worker_uss_mib"]))
    return 0
