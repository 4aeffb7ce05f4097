"""``singularity-ds bench download``: download throughput from a local HTTP server (127.0.0.1).

Writes synthetic clips (``--clips`` of ``--src-size`` px, ``--seconds`` at 24 fps, H.264: about a WebVid
clip's frame count at a smaller size) and JPEG images, serves them with ``http.server`` and runs the
real downloader on them with 1..``--max-decoders`` decoder processes (re-encoding to 2 fps, 224 px).
Reports clips/s and clips/s per decoder process (per core, when the machine is otherwise idle).
"""
import argparse
import csv
import functools
import os
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from ...fileio import write_json


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_media(folder: str, clips: int, images: int, size: int, seconds: float) -> tuple:
    from PIL import Image

    from ..synthetic import plan_clips, render, write_clip
    os.makedirs(folder, exist_ok=True)
    plans = plan_clips(max(18, clips), 0)
    names = []
    for i in range(clips):
        name = f"clip_{i:04d}.mp4"
        write_clip(os.path.join(folder, name), render(plans[i], size, round(seconds * 24)), 24)
        names.append(name)
    pics = []
    for i in range(images):
        name = f"image_{i:04d}.jpg"
        frame = render(plans[i % len(plans)], size, 2)[0]
        Image.fromarray(frame).resize((size * 4 // 3, size)).save(os.path.join(folder, name), quality=90)
        pics.append(name)
    return names, pics


def _url_list(path: str, base: str, names) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["contentUrl", "name", "videoid"])
        for n in names:
            w.writerow([f"{base}/{n}", f"caption of {n}", n.split(".")[0]])
    return path


def main(argv=None) -> int:
    from . import download
    p = argparse.ArgumentParser(prog="singularity-ds bench download", description=__doc__)
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--src-size", type=int, default=320, help="source clip height/width, pixels")
    p.add_argument("--seconds", type=float, default=8.0, help="source clip length (24 fps)")
    p.add_argument("--max-decoders", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=8, help="download threads")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        media = os.path.join(tmp, "media")
        t0 = time.time()
        clips, images = make_media(media, args.clips, args.images, args.src_size, args.seconds)
        print(f"wrote {len(clips)} clips and {len(images)} images in {time.time() - t0:.1f} s")
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=media))
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        try:
            # warm-up: the decoders' fork server imports the package once per process
            download(_url_list(os.path.join(tmp, "warm.csv"), base, clips[:1]), os.path.join(tmp, "warm"),
                     decoders=1, progress=False)
            for media_type, names in (("video", clips), ("image", images)):
                for decoders in range(1, args.max_decoders + 1):
                    lst = _url_list(os.path.join(tmp, f"{media_type}{decoders}.csv"), base, names)
                    res = download(lst, os.path.join(tmp, f"{media_type}{decoders}"), media_type=media_type,
                                   decoders=decoders, workers=args.workers, progress=False)
                    rate = res["run_ok"] / res["seconds"]
                    results.append(dict(media_type=media_type, decoders=decoders, items=len(names),
                                        ok=res["run_ok"], seconds=round(res["seconds"], 2),
                                        per_s=round(rate, 2), per_s_per_decoder=round(rate / decoders, 2)))
        finally:
            httpd.shutdown()
            httpd.server_close()
    print(f"{'media':<7}{'decoders':>9}{'items':>7}{'ok':>5}{'seconds':>9}{'items/s':>9}{'per decoder':>13}")
    for r in results:
        print(f"{r['media_type']:<7}{r['decoders']:>9}{r['items']:>7}{r['ok']:>5}{r['seconds']:>9.2f}"
              f"{r['per_s']:>9.2f}{r['per_s_per_decoder']:>13.2f}")
    if args.json:
        write_json(dict(args=vars(args), results=results), args.json)
    return 0
