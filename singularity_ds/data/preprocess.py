"""``singularity-ds preprocess videos|images SRC DST``: shrink a media folder before training.

The original Singularity's ``preprocess/compress.py`` re-done with PyAV and PIL, so no ffmpeg binary is
needed. SRC is walked recursively and DST mirrors its relative paths:

- videos (.mp4 .avi .mkv .webm .mov .m4v .mpg .mpeg .flv .gif) become H.264 ``.mp4`` files at a constant
  ``--fps`` (output frame k shows the latest input frame at or before k/fps), shorter side ``--size``
  (the other side keeps the aspect ratio, rounded to even), no audio; ``--trim S`` keeps the first S
  seconds (the original's DiDeMo preprocessing keeps 30);
- images (.jpg .jpeg .png .bmp .webp) become RGB JPEGs (quality 95), shorter side ``--size``.

Resumable: outputs are written under a temporary name and renamed when complete, a rerun skips files
whose output exists and first deletes temporaries a killed run left behind. A file that fails is
listed in ``DST/preprocess_failures.json`` and never stops the batch (exit status 1 if any failed).
"""
import argparse
import os
import re
import sys
from fractions import Fraction

from ..config.args import positive
from ..fileio import write_json
from ..paper import load as load_paper


def presets() -> dict:
    """The downstream media folders the original's configs read, with their re-encoding (paper.yaml
    ``media``; SSv2 is used as downloaded: no preset)."""
    return {name: m for name, m in load_paper().media.items() if "size" in m}


def _preset_text(m: dict) -> str:
    return (f"{m['kind']}, {m['folder']}: " + (f"{m['fps']} fps, " if "fps" in m else "") + f"{m['size']} px"
            + (f", first {m['trim']} s" if "trim" in m else ""))

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".gif"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
OUT_EXT = {"videos": ".mp4", "images": ".jpg"}
FAILURES = "preprocess_failures.json"
TMP_RE = re.compile(r"\.tmp-\d+\.(mp4|jpg)$")  # matches temp_name() below


def temp_name(path: str) -> str:
    """``a/b.mp4`` -> ``a/b.tmp-<pid>.mp4``: the real extension stays last so PyAV/PIL pick the format."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.tmp-{os.getpid()}{ext}"


def scaled_size(width: int, height: int, size: int, even: bool = False):
    """Shorter side -> ``size`` (up or down, like the original), the other side keeps the aspect ratio."""
    step = 2 if even else 1  # yuv420p needs even dimensions
    if width <= height:
        return size, max(step, round(height * size / width / step) * step)
    return max(step, round(width * size / height / step) * step), size


def compress_image(src: str, dst: str, size: int) -> None:
    from PIL import Image
    with Image.open(src) as img:
        img = img.convert("RGB")
        img.resize(scaled_size(img.width, img.height, size), Image.BICUBIC).save(dst, "JPEG", quality=95)


class TooLong(ValueError):
    """The video runs past ``max_duration`` while decoding, whatever its header said."""


def reencode(media_type: str, src: str, dst: str, size: int, fps: Fraction = Fraction(2), trim=None,
             max_duration=None):
    """The one re-encoding rule, shared by ``preprocess`` and ``download``: ``media_type`` ``video``
    (H.264 ``dst``, returns its duration in seconds) or ``image`` (JPEG ``dst``, returns None)."""
    if media_type == "video":
        return compress_video(src, dst, size, fps, trim, max_duration)
    compress_image(src, dst, size)
    return None


def compress_video(src: str, dst: str, size: int, fps: Fraction, trim: Fraction = None,
                   max_duration=None) -> float:
    """-> the output's duration in seconds. Past ``max_duration`` of input: :class:`TooLong` (decoding
    stops there, so a file whose header lies about its length costs no more than that)."""
    import av
    step = 1 / fps  # Fractions throughout: "timestamp <= k/fps" is compared exactly
    with av.open(src) as source, av.open(dst, "w", format="mp4") as out:
        if not source.streams.video:
            raise ValueError("no video stream")
        stream_in = source.streams.video[0]
        stream_in.thread_type = "AUTO"
        stream_out = None
        latest = scaled = None  # the input frame currently shown, and its resized copy (made when needed)
        t0, end, k = None, Fraction(0), 0
        rate = Fraction(stream_in.average_rate or stream_in.guessed_rate or 25)  # frames without pts/duration

        def emit_until(t):  # output frames k with k/fps < t show `latest`
            nonlocal k, scaled
            while k * step < t:
                if scaled is None:
                    scaled = latest.reformat(width=stream_out.width, height=stream_out.height,
                                             format="yuv420p", interpolation="BICUBIC")
                scaled.pts, scaled.time_base = k, step
                out.mux(stream_out.encode(scaled))
                k += 1

        for i, frame in enumerate(source.decode(stream_in)):
            t = frame.pts * frame.time_base if frame.pts is not None and frame.time_base else i / rate
            t0 = t if t0 is None else t0
            t -= t0  # outputs start at the first frame, whatever the container's start time
            if trim is not None and t >= trim:
                end = trim  # the input goes on past it
                break
            if max_duration is not None and t > max_duration:
                raise TooLong(f"longer than {float(max_duration):g} s")
            if stream_out is None:
                stream_out = out.add_stream("libx264", rate=fps)
                stream_out.width, stream_out.height = scaled_size(frame.width, frame.height, size, even=True)
                stream_out.pix_fmt = "yuv420p"
                stream_out.options = {"crf": "23", "preset": "fast"}
            else:
                emit_until(t)
            latest, scaled = frame, None
            duration = frame.duration * frame.time_base if frame.duration and frame.time_base else 1 / rate
            end = t + duration
        if latest is None:
            raise ValueError("no decodable video frames")
        emit_until(min(end, trim) if trim is not None else end)
        out.mux(stream_out.encode())  # flush the encoder
        return float(k * step)


def process(job) -> tuple:
    """One file (top-level so a process pool can pickle it): (relative path, error or None)."""
    kind, src, dst, rel, size, fps, trim = job
    tmp = temp_name(dst)
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        reencode(kind.rstrip("s"), src, tmp, size, fps, trim)  # videos|images -> video|image
        os.replace(tmp, dst)  # the output appears only once complete
        return rel, None
    except Exception as e:  # any decoder/encoder error: record it, keep going
        lines = str(e).strip().splitlines()
        return rel, f"{type(e).__name__}: {lines[0] if lines else ''}".strip()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_jobs(kind: str, src: str, dst: str, size: int, fps: Fraction, trim):
    exts = VIDEO_EXTS if kind == "videos" else IMAGE_EXTS
    jobs = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if os.path.abspath(os.path.join(root, d)) != dst)  # DST inside SRC
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in exts:
                rel = os.path.relpath(os.path.join(root, name), src)
                out = os.path.join(dst, os.path.splitext(rel)[0] + OUT_EXT[kind])
                jobs.append((kind, os.path.join(root, name), out, rel, size, fps, trim))
    return jobs


def remove_stale_temps(dst: str) -> None:
    for root, _, files in os.walk(dst):
        for name in files:
            if TMP_RE.search(name):
                os.remove(os.path.join(root, name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="singularity-ds preprocess",
        description="Re-encode a folder of videos (H.264, constant FPS, no audio) or images (JPEG), "
                    "shorter side SIZE, mirroring SRC's relative paths under DST. Resumable; failures go "
                    "to DST/" + FAILURES + ".",
        usage="%(prog)s videos|images SRC DST [--preset DATASET] [--fps 2] [--size 224] [--workers N] "
              "[--trim SECONDS]")
    parser.add_argument("kind", choices=("videos", "images"), metavar="videos|images")
    parser.add_argument("src", metavar="SRC", help="input folder (walked recursively)")
    parser.add_argument("dst", metavar="DST", help="output folder (mirrors SRC's relative paths)")
    known = presets()
    parser.add_argument("--preset", choices=sorted(known), metavar="DATASET",
                        help="the original's re-encoding of this downstream dataset, as its configs' media "
                             "folder names say (" + "; ".join(f"{k}: {_preset_text(v)}" for k, v in
                                                             sorted(known.items())) + "); --fps/--size/"
                             "--trim given too win")
    parser.add_argument("--fps", type=positive(Fraction), help="output frame rate (videos; default 2)")
    parser.add_argument("--size", type=positive(int), help="output shorter side, in pixels (default 224)")
    parser.add_argument("--workers", type=positive(int), default=1, metavar="N",
                        help="processes (1: no pool)")
    parser.add_argument("--trim", type=positive(Fraction), metavar="SECONDS",
                        help="keep only the first SECONDS (videos; the original's DiDeMo setup used 30)")
    args = parser.parse_args(argv)
    preset = known.get(args.preset, {})
    if preset and preset["kind"] != args.kind:
        parser.error(f"--preset {args.preset} is for {preset['kind']}, not {args.kind}")
    args.fps = args.fps or Fraction(preset.get("fps", 2))
    args.size = args.size or preset.get("size", 224)
    args.trim = args.trim or (Fraction(preset["trim"]) if "trim" in preset else None)
    if args.kind == "videos" and args.size % 2:
        parser.error("--size must be even for videos (yuv420p)")
    if not os.path.isdir(args.src):
        parser.error(f"SRC {args.src} is not a folder")
    src, dst = os.path.abspath(args.src), os.path.abspath(args.dst)
    os.makedirs(dst, exist_ok=True)
    remove_stale_temps(dst)

    jobs = find_jobs(args.kind, src, dst, args.size, args.fps, args.trim)
    failures, outputs, unique = [], set(), []
    for j in jobs:  # a.avi and a.mkv would both write a.mp4: keep the first
        if j[2] in outputs:
            failures.append({"file": j[3],
                             "error": f"output {os.path.relpath(j[2], dst)} collides with another"})
        else:
            outputs.add(j[2])
            unique.append(j)
    todo = [j for j in unique if not os.path.exists(j[2])]
    skipped = len(unique) - len(todo)

    from tqdm import tqdm
    bar = dict(total=len(jobs), initial=len(jobs) - len(todo), desc=f"preprocess {args.kind}", unit="file")
    if args.workers > 1 and len(todo) > 1:
        from multiprocessing import Pool
        with Pool(min(args.workers, len(todo))) as pool:
            chunks = 1 if args.kind == "videos" else 16  # images are quick: fewer round trips
            results = list(tqdm(pool.imap_unordered(process, todo, chunksize=chunks), **bar))
    else:
        results = list(tqdm(map(process, todo), **bar))
    failures += [{"file": rel, "error": err} for rel, err in sorted(results) if err is not None]
    failures_path = os.path.join(dst, FAILURES)
    write_json(failures, failures_path)  # rewritten every run, so it lists this run's failures only
    done = sum(err is None for _, err in results)
    print(f"{done} done, {skipped} skipped (already present), {len(failures)} failed (see {failures_path})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
