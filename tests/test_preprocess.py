"""`singularity-ds preprocess`: PyAV/PIL re-encoding of video and image folders, resumable and
failure-tolerant."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from PIL import Image

from singularity_ds.data.preprocess import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_clip(path, seconds, fps, width, height, codec="libx264", audio=False, values=None, noise=False):
    """A small clip; frame i is flat grey ``values[i]`` (or random noise, to make encoding slow)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {".mp4": "mp4", ".avi": "avi", ".mkv": "matroska"}[os.path.splitext(path)[1]]
    n = round(seconds * fps)
    values = values if values is not None else [(17 * i) % 256 for i in range(n)]
    rng = np.random.default_rng(0)
    with av.open(path, "w", format=fmt) as c:
        v = c.add_stream(codec, rate=fps)
        v.width, v.height = width, height
        v.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        v.options = {"preset": "ultrafast"} if codec == "libx264" else {}
        a = c.add_stream("aac", rate=16000, layout="mono") if audio else None
        for i in range(n):
            img = (rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise
                   else np.full((height, width, 3), values[i], np.uint8))
            c.mux(v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(v.encode())
        if a is not None:
            for start in range(0, round(seconds * 16000), 1024):
                frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.pts = 16000, start
                c.mux(a.encode(frame))
            c.mux(a.encode())


def probe(path):
    """(stream types, average rate, width, height, decoded frame count, duration in s, frames' mean grey)."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        means = [f.to_ndarray(format="gray").mean() for f in c.decode(v)]
        return dict(types=[s.type for s in c.streams], rate=v.average_rate, w=v.width, h=v.height,
                    frames=len(means), duration=c.duration / 1e6, means=means)


def temps(folder):
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    write_clip(str(src / "a" / "b" / "land.mp4"), 3, 25, 96, 64, audio=True)  # landscape, with audio
    write_clip(str(src / "a" / "port.avi"), 2, 30, 80, 120, codec="mjpeg")    # portrait
    Image.new("RGB", (20, 20)).save(src / "a" / "ignored.png")                # not a video
    return src


def test_videos_constant_rate_shorter_side_no_audio(clips, tmp_path, capsys):
    with av.open(str(clips / "a" / "b" / "land.mp4")) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}  # so "audio dropped" means something
    dst = tmp_path / "out"
    assert main(["videos", str(clips), str(dst), "--size", "32"]) == 0
    assert "2 done, 0 skipped (already present), 0 failed" in capsys.readouterr().out
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*.*")) == [
        "a/b/land.mp4", "a/port.mp4", "preprocess_failures.json"]
    assert json.loads((dst / "preprocess_failures.json").read_text()) == []
    for rel, (w, h), seconds in [("a/b/land.mp4", (96, 64), 3), ("a/port.mp4", (80, 120), 2)]:
        p = probe(dst / rel)
        assert p["types"] == ["video"]
        assert p["rate"] == 2
        assert p["frames"] == seconds * 2  # frame k shows time k / 2 s, for k < 2 x seconds
        assert abs(p["duration"] - seconds) < 0.1
        assert min(p["w"], p["h"]) == 32 and p["w"] % 2 == 0 and p["h"] % 2 == 0
        assert abs(p["w"] / p["h"] - w / h) < 2 / 32  # aspect ratio within the rounding to even
    assert (probe(dst / "a/b/land.mp4")["w"], probe(dst / "a/port.mp4")["h"]) == (48, 48)


def test_trim_keeps_the_first_seconds(clips, tmp_path):
    dst = tmp_path / "out"
    assert main(["videos", str(clips / "a" / "b"), str(dst), "--size", "32", "--trim", "1"]) == 0
    p = probe(dst / "land.mp4")
    assert abs(p["duration"] - 1) < 0.1 and p["frames"] == 2 and p["rate"] == 2


@pytest.mark.parametrize("fps", [2, 10])
def test_output_frame_k_shows_latest_input_frame_at_or_before_k_over_fps(tmp_path, fps):
    values = [25 * i for i in range(10)]  # 2 s at 5 fps, each frame its own grey level
    write_clip(str(tmp_path / "src" / "c.mkv"), 2, 5, 64, 48, values=values)
    assert main(["videos", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "32",
                 "--fps", str(fps)]) == 0
    p = probe(tmp_path / "out" / "c.mp4")
    expected = [values[int(k / fps * 5 + 1e-9)] for k in range(2 * fps)]  # input frame i is at i/5 s
    assert p["frames"] == len(expected) and p["rate"] == fps
    assert np.allclose(p["means"], expected, atol=6), (p["means"], expected)


def test_images_shorter_side_rgb_jpeg(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    (src / "x" / "y").mkdir(parents=True)
    Image.new("RGBA", (100, 50), (200, 10, 10, 128)).save(src / "x" / "wide.png")
    Image.new("L", (40, 90), 77).save(src / "x" / "y" / "tall.png")
    assert main(["images", str(src), str(dst), "--size", "32"]) == 0
    for rel, size in [("x/wide.jpg", (64, 32)), ("x/y/tall.jpg", (32, 72))]:
        with Image.open(dst / rel) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size)
    with pytest.raises(SystemExit):  # yuv420p needs even dimensions
        main(["videos", str(src), str(dst), "--size", "31"])


def test_failures_are_recorded_and_leave_nothing_behind(clips, tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    shutil.copytree(clips / "a" / "b", src)
    (src / "sub").mkdir()
    (src / "sub" / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    assert main(["videos", str(src), str(dst), "--size", "32"]) == 1
    assert "1 done, 0 skipped (already present), 1 failed" in capsys.readouterr().out
    failures = json.loads((dst / "preprocess_failures.json").read_text())
    assert [f["file"] for f in failures] == ["sub/broken.mp4"]
    assert failures[0]["error"] and "\n" not in failures[0]["error"]
    assert not (dst / "sub" / "broken.mp4").exists() and temps(dst) == []
    assert probe(dst / "land.mp4")["rate"] == 2


@pytest.mark.multiproc  # a process pool, killed and resumed
def test_killed_run_resumes_without_partial_or_duplicate_outputs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    write_clip(str(src / "clip00.mp4"), 4, 25, 160, 120, noise=True)  # noise: slow enough to interrupt
    names = [f"d{i % 3}/clip{i:02d}.mp4" for i in range(12)]
    for name in names[1:]:
        (src / name).parent.mkdir(exist_ok=True)
        shutil.copy(src / "clip00.mp4", src / name)
    shutil.move(src / "clip00.mp4", src / names[0])
    cmd = [sys.executable, "-m", "singularity_ds.data.preprocess", "videos", str(src), str(dst),
           "--size", "64", "--fps", "25", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    # own session, so SIGKILL takes the pool's workers too, as a killed job would
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not [p for p in dst.rglob("*.mp4") if ".tmp-" not in p.name]:
            assert proc.poll() is None and time.time() < deadline, \
                "first run ended before any output appeared"
            time.sleep(0.01)
        assert proc.poll() is None, "first run finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    done = {p: p.stat().st_mtime_ns for p in dst.rglob("*.mp4") if ".tmp-" not in p.name}
    assert 0 < len(done) < len(names)
    (dst / "d1").mkdir(exist_ok=True)
    stale = dst / "d1" / "clip04.tmp-999999.mp4"
    stale.write_bytes(b"half a file")  # a temporary left by a killed worker

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(names) - len(done)} done, {len(done)} skipped (already present), 0 failed" in rerun.stdout
    assert temps(dst) == []
    outputs = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.mp4"))
    assert outputs == sorted(names)  # exactly one output per source
    assert {p: p.stat().st_mtime_ns for p in done} == done  # skipped outputs were not rewritten
    for name in outputs:
        p = probe(dst / name)
        assert p["frames"] == 100 and p["rate"] == 25 and (p["w"], p["h"]) == (86, 64)
