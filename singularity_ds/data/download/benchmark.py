"""``singularity-ds bench download``: download throughput from a local HTTP server (127.0.0.1).

Writes synthetic clips (``--clips`` of ``--src-size`` px, ``--seconds`` at 24 fps, H.264) and JPEG
images (kept in ``--media-dir`` for reruns), serves them with ``python -m http.server`` in another
process and runs the real downloader on them with 1..``--max-decoders`` decoder processes
(re-encoding to 2 fps, 224 px). Reports items/s (wall clock: depends on what else the machine runs)
and items per CPU-second (the downloader process plus its decoders: clips/s per core on an idle
machine, and much less sensitive to other load).
"""
import argparse
import csv
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

from ...fileio import write_json


def make_media(folder: str, clips: int, images: int, size: int, seconds: float, grain: float = 0) -> tuple:
    """The clips and images (those already in ``folder`` with these settings are kept). ``grain``: the
    std of per-pixel noise added to every frame (flat synthetic frames decode far faster than camera
    footage; grain makes the bitrate and decoding cost more like it)."""
    import numpy as np
    from PIL import Image

    from ..synthetic import plan_clips, render, write_clip
    os.makedirs(folder, exist_ok=True)
    plans = plan_clips(max(18, clips), 0)
    names, pics = [], []
    for i in range(clips):
        name = f"clip_{i:04d}_{size}px_{seconds:g}s_grain{grain:g}.mp4"
        if not os.path.exists(os.path.join(folder, name)):
            frames = render(plans[i], size, round(seconds * 24))
            if grain:
                noise = np.random.default_rng(i).normal(0, grain, frames.shape)
                frames = np.clip(frames + noise, 0, 255).astype(np.uint8)
            write_clip(os.path.join(folder, name), frames, 24)
        names.append(name)
    for i in range(images):
        name = f"image_{i:04d}_{size}px.jpg"
        if not os.path.exists(os.path.join(folder, name)):
            frame = render(plans[i % len(plans)], size, 2)[0]
            Image.fromarray(frame).resize((size * 4 // 3, size)).save(os.path.join(folder, name), quality=90)
        pics.append(name)
    return names, pics


def _serve(folder: str):
    """``python -m http.server`` on a free 127.0.0.1 port, in its own process (its CPU is not ours)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("the local HTTP server did not start")


def _url_list(path: str, base: str, names) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["contentUrl", "name", "videoid"])
        for n in names:
            w.writerow([f"{base}/{n}", f"caption of {n}", n.split(".")[0]])
    return path


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    from . import download
    p = argparse.ArgumentParser(prog="singularity-ds bench download", description=__doc__)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--src-size", type=int, default=320, help="source clip height/width, pixels")
    p.add_argument("--seconds", type=float, default=8.0, help="source clip length (24 fps)")
    p.add_argument("--grain", type=float, default=0, help="per-pixel noise std added to the clips' frames")
    p.add_argument("--max-decoders", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=8, help="download threads")
    p.add_argument("--media-dir", help="keep the generated media here (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        media = args.media_dir or os.path.join(tmp, "media")
        t0 = time.time()
        clips, images = make_media(media, args.clips, args.images, args.src_size, args.seconds, args.grain)
        print(f"media ready ({len(clips)} clips, {len(images)} images) in {time.time() - t0:.1f} s")
        server, base = _serve(media)
        try:
            # warm-up: the decoders' fork server imports the package once per process
            download(_url_list(os.path.join(tmp, "warm.csv"), base, clips[:1]), os.path.join(tmp, "warm"),
                     decoders=1, progress=False)
            for media_type, names in (("video", clips), ("image", images)):
                for decoders in range(1, args.max_decoders + 1):
                    if not names:
                        continue
                    lst = _url_list(os.path.join(tmp, f"{media_type}{decoders}.csv"), base, names)
                    cpu = _cpu()
                    res = download(lst, os.path.join(tmp, f"{media_type}{decoders}"), media_type=media_type,
                                   decoders=decoders, workers=args.workers, progress=False)
                    cpu = _cpu() - cpu + res["run_decode_cpu"]
                    results.append(dict(media_type=media_type, decoders=decoders, items=len(names),
                                        ok=res["run_ok"], seconds=round(res["seconds"], 2),
                                        per_s=round(res["run_ok"] / res["seconds"], 2),
                                        cpu_s=round(cpu, 2), decode_cpu_s=round(res["run_decode_cpu"], 2),
                                        per_cpu_s=round(res["run_ok"] / cpu, 2)))
        finally:
            server.kill()
            server.wait()
    print(f"{'media':<7}{'decoders':>9}{'items':>7}{'ok':>5}{'wall s':>8}{'items/s':>9}{'CPU s':>8}"
          f"{'decode CPU s':>14}{'items/CPU-s':>13}")
    for r in results:
        print(f"{r['media_type']:<7}{r['decoders']:>9}{r['items']:>7}{r['ok']:>5}{r['seconds']:>8.2f}"
              f"{r['per_s']:>9.2f}{r['cpu_s']:>8.2f}{r['decode_cpu_s']:>14.2f}{r['per_cpu_s']:>13.2f}")
    if args.json:
        write_json(dict(args=vars(args), results=results), args.json)
    return 0
