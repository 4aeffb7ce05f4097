"""Downloaded files are probed and re-encoded in worker processes, never in the downloader itself.

A hostile or broken file may crash or hang a decoder (FFmpeg and PIL are C code): each worker is a
process that takes one job at a time over a pipe, so a crash is that job's ``decode_error`` (the
worker is started again) and a job running past ``decode_timeout`` gets its worker killed. The
re-encoding is :func:`..preprocess.reencode`, the code of ``singularity-ds preprocess``.
"""
import multiprocessing
import os
import queue
import signal
import threading
import time
from fractions import Fraction
from typing import NamedTuple, Optional

MAX_PIXELS = 7680 * 4320  # 8K: a larger frame is refused (too_large) before decoding


class Job(NamedTuple):
    media_type: str          # video | image
    src: str
    dst: str
    size: int
    fps: Fraction
    trim: Optional[Fraction]
    min_duration: float
    max_duration: float


class Decoded(NamedTuple):
    status: str
    error: str
    duration: Optional[float]   # the output's seconds (videos)
    cpu: Optional[float] = None  # CPU seconds the worker spent (all its threads); None if it died


def _probe_video(src: str, job: Job) -> Optional[Decoded]:
    """A refusal from the container header (not media, too long/short, too many pixels), or None."""
    import av
    try:
        container = av.open(src)
    except Exception as e:  # not a container FFmpeg knows: an HTML page, a truncated header, ...
        return Decoded("not_media", f"not a video ({type(e).__name__}: {_line(e)})", None)
    with container:
        if not container.streams.video:
            return Decoded("not_media", "no video stream", None)
        stream = container.streams.video[0]
        if (stream.codec_context.width or 0) * (stream.codec_context.height or 0) > MAX_PIXELS:
            return Decoded("too_large", f"{stream.codec_context.width}x{stream.codec_context.height} frames",
                           None)
        seconds = None
        if container.duration is not None:
            seconds = container.duration / av.time_base
        elif stream.duration is not None and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
    if seconds is not None and seconds > job.max_duration:
        return Decoded("too_long", f"{seconds:.1f} s, over the cap of {job.max_duration:g} s", None)
    if seconds is not None and seconds < job.min_duration:
        return Decoded("too_short", f"{seconds:.2f} s, under {job.min_duration:g} s", None)
    return None


def _line(e) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def decode(job: Job) -> Decoded:
    """Probe ``job.src`` and re-encode it to ``job.dst`` (runs in a worker process)."""
    from PIL import Image

    from ..preprocess import TooLong, reencode
    if job.media_type == "video":
        refused = _probe_video(job.src, job)
        if refused is not None:
            return refused
    else:
        try:
            with Image.open(job.src) as img:
                if img.width * img.height > MAX_PIXELS:
                    return Decoded("too_large", f"{img.width}x{img.height} pixels", None)
        except Image.DecompressionBombError as e:
            return Decoded("too_large", _line(e), None)
        except Exception as e:
            return Decoded("not_media", f"not an image ({type(e).__name__}: {_line(e)})", None)
    try:
        duration = reencode(job.media_type, job.src, job.dst, job.size, job.fps, job.trim,
                            max_duration=job.max_duration)
    except TooLong as e:
        return Decoded("too_long", f"{_line(e)} (while decoding; the header said less)", None)
    except Exception as e:
        return Decoded("decode_error", f"{type(e).__name__}: {_line(e)}", None)
    if duration is not None and duration < job.min_duration:
        return Decoded("too_short", f"{duration:.2f} s, under {job.min_duration:g} s", duration)
    return Decoded("ok", "", duration)


def _serve(conn) -> None:
    """A worker: jobs in, results out, until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        start = time.process_time()
        conn.send(decode(job)._replace(cpu=round(time.process_time() - start, 4)))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def kill(self):
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class DecodePool:
    """``n`` decoder processes shared by the download threads: :meth:`run` blocks until one is free."""

    def __init__(self, n: int, timeout: float = 300):
        # workers fork from a fork server that imported this module once: no fork of the threaded
        # parent, and no package import (seconds) per worker; one server serves every pool of a process
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__, "av", "PIL.Image"])
        self.timeout = timeout
        self.idle = queue.Queue()
        self.workers = []
        self.lock = threading.Lock()
        for _ in range(n):
            self._add()

    def _add(self):
        w = _Worker(self.ctx)
        with self.lock:
            self.workers.append(w)
        self.idle.put(w)

    def _replace(self, w):
        w.kill()
        with self.lock:
            self.workers.remove(w)
        self._add()

    def busy_pids(self):
        """PIDs of the worker processes (for tests that crash one)."""
        with self.lock:
            return [w.process.pid for w in self.workers]

    def run(self, job: Job) -> Decoded:
        w = self.idle.get()
        try:
            w.conn.send(job)
            if not w.conn.poll(self.timeout):
                self._replace(w)
                return Decoded("decode_error", f"decoding took over {self.timeout:g} s (worker killed)", None)
            result = w.conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            w.process.join(5)
            code = w.process.exitcode
            self._replace(w)
            how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            return Decoded("decode_error", f"the decoder process died ({how})", None)
        self.idle.put(w)
        return result

    def close(self):
        with self.lock:
            workers = list(self.workers)
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in workers:
            w.process.join(5)
            w.kill()
