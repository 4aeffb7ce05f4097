"""Frame sampling and video decoding.

Sampling is the original's (``get_frame_indices``): ``rand`` draws one frame per equal segment (with
its sorted-permutation fallback for very short videos), ``middle`` takes each segment's middle,
``uniform`` is an alias of ``middle``, ``fpsX`` samples sequentially at X frames per second; short
videos repeat the last index. Decoding sits behind :class:`VideoReader` (``probe`` + ``decode`` of given
indices) so a GPU backend can replace it and produce the same frames from the same indices.
"""
import logging
import os
import random
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import MediaError

logger = logging.getLogger(__name__)

SAMPLE_TYPES = ("rand", "middle", "uniform", "fpsX")



class MemoryFile(str):
    """A media file already in memory (a sample read from a tar shard): the string is its name, for
    messages; readers open ``data`` instead of a path."""

    def __new__(cls, name: str, data: bytes):
        obj = super().__new__(cls, name)
        obj.data = data
        return obj

    def __reduce__(self):
        return MemoryFile, (str(self), self.data)


def _source(path):
    """What a decoder opens: the path, or a file object over an in-memory file."""
    import io
    return io.BytesIO(path.data) if isinstance(path, MemoryFile) else path


def get_frame_indices(num_frames: int, vlen: int, sample: str = "rand", input_fps: float = 1.0,
                      max_num_frames: int = -1, rng: random.Random = None) -> List[int]:
    """Frame indices exactly as the original samples them (``rng`` replaces Python's global
    ``random`` for ``rand``; its fallback uses a numpy generator seeded from ``rng``)."""
    if vlen <= 0:
        raise ValueError("video has no frames")
    rng = rng or random.Random()
    if sample in ("rand", "middle", "uniform"):
        acc = min(num_frames, vlen)
        edges = np.linspace(0, vlen, acc + 1).astype(int)
        ranges = [(int(edges[i]), int(edges[i + 1]) - 1) for i in range(acc)]
        if sample == "rand":
            if all(b > a for a, b in ranges):  # the original's random.choice(range(a, b)): b excluded
                idx = [rng.choice(range(a, b)) for a, b in ranges]
            else:  # a segment too short to draw from: sorted random subset, as the original
                perm = np.random.default_rng(rng.getrandbits(32)).permutation(vlen)[:acc]
                idx = sorted(int(i) for i in perm)
        else:
            idx = [(a + b) // 2 for a, b in ranges]
        if len(idx) < num_frames:  # pad with the last frame
            idx = idx + [idx[-1]] * (num_frames - len(idx))
        return idx
    if sample.startswith("fps"):
        try:
            output_fps = float(sample[3:])
        except ValueError:
            raise ValueError(f"sample type {sample!r}: expected fps<float>, e.g. fps0.5") from None
        duration = vlen / input_fps
        delta = 1 / output_fps
        seconds = np.arange(delta / 2, duration + delta / 2, delta)
        idx = [int(i) for i in np.around(seconds * input_fps).astype(int) if i < vlen]
        if max_num_frames > 0:
            idx = idx[:max_num_frames]
        return idx
    raise ValueError(f"unknown sample type {sample!r}; expected one of rand, middle, uniform, fps<X>")


class VideoReader:
    """Decoding backend: ``probe(path) -> (num_frames, fps)``, ``decode(path, indices) -> uint8 (T, C, H, W)``."""

    name = "base"

    def probe(self, path: str) -> Tuple[int, float]:
        raise NotImplementedError

    def decode(self, path: str, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def read(self, path, num_frames, sample_type="rand", rng=None, max_num_frames=-1):
        """-> (frames uint8 (T, C, H, W), indices, duration_s)."""
        vlen, fps = self.probe(path)
        indices = get_frame_indices(num_frames, vlen, sample_type, fps, max_num_frames, rng)
        return self.decode(path, indices), indices, vlen / fps


class DecordReader(VideoReader):
    name = "decord"

    def _open(self, path):
        import decord
        try:
            return decord.VideoReader(_source(path), num_threads=1)
        except Exception as e:  # decord raises its own DECORDError / RuntimeError
            raise MediaError(path, f"decord cannot open it ({str(e).splitlines()[0][:200]})") from None

    def probe(self, path):
        vr = self._open(path)
        return len(vr), float(vr.get_avg_fps())

    def decode(self, path, indices):
        vr = self._open(path)
        try:
            frames = vr.get_batch(list(indices)).asnumpy()
        except Exception as e:
            raise MediaError(path, f"decord failed to decode frames {list(indices)} ({str(e).splitlines()[0][:200]})") from None
        return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()


class PyAVReader(VideoReader):
    """PyAV (FFmpeg): reads the containers decord cannot. Decodes sequentially up to the last index."""

    name = "av"

    def _frames(self, path, stop=None):
        import av
        try:
            with av.open(_source(path)) as container:
                if not container.streams.video:
                    raise MediaError(path, "no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                frames = []
                for frame in container.decode(stream):
                    frames.append(frame)
                    if stop is not None and len(frames) > stop:
                        break
                rate = stream.average_rate or stream.guessed_rate
                fps = float(rate) if rate else 0.0
                if not fps and stream.duration and stream.time_base and frames:
                    fps = len(frames) / float(stream.duration * stream.time_base)
                return frames, fps
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(path, f"PyAV cannot decode it ({type(e).__name__}: {str(e)[:200]})") from None

    def probe(self, path):
        frames, fps = self._frames(path)
        return len(frames), fps or 1.0

    def decode(self, path, indices):
        frames, _ = self._frames(path, stop=max(indices))
        return self._select(path, frames, indices)

    def read(self, path, num_frames, sample_type="rand", rng=None, max_num_frames=-1):
        frames, fps = self._frames(path)  # one decoding pass: the frame count is what decodes
        if not frames:
            raise MediaError(path, "video has no frames")
        fps = fps or 1.0
        indices = get_frame_indices(num_frames, len(frames), sample_type, fps, max_num_frames, rng)
        return self._select(path, frames, indices), indices, len(frames) / fps

    @staticmethod
    def _select(path, frames, indices):
        if max(indices) >= len(frames):
            raise MediaError(path, f"asked for frame {max(indices)} of a {len(frames)}-frame video")
        arrays = {i: frames[i].to_ndarray(format="rgb24") for i in set(indices)}
        return torch.from_numpy(np.stack([arrays[i] for i in indices])).permute(0, 3, 1, 2).contiguous()


READERS = {"decord": DecordReader, "av": PyAVReader}


def get_reader(name: str) -> VideoReader:
    """``decord`` | ``av`` | ``dali`` (an error without DALI) | ``auto`` (DALI when installed, per-file
    decord fallback; decord without DALI -- each said once in the log)."""
    if name in ("dali", "auto"):  # optional dependency: imported only when asked for
        from .dali import DaliReader, dali_missing
        if name == "auto" and dali_missing():
            logger.warning("video_input.reader=auto: %s; using decord", dali_missing())
            return DecordReader()
        return DaliReader(fallback=name == "auto")
    try:
        return READERS[name]()
    except KeyError:
        raise ValueError(f"unknown video reader {name!r}; expected one of {sorted(READERS) + ['dali', 'auto']}") from None


def read_frames(path: str, num_frames: int, sample_type: str = "rand", reader="decord",
                rng: random.Random = None, max_num_frames: int = -1, fallback: bool = True):
    """-> (frames uint8 (T, C, H, W), indices, duration_s). ``reader``: a name or a VideoReader.

    With ``fallback``, a file decord cannot read is retried with PyAV (FFmpeg reads more containers:
    GIF, SWF, ...); a file neither can read raises one :class:`MediaError` with both reasons.
    """
    check_file(path)
    reader = get_reader(reader) if isinstance(reader, str) else reader
    try:
        return reader.read(path, num_frames, sample_type, rng, max_num_frames)
    except MediaError as first:
        if not fallback or isinstance(reader, PyAVReader):
            raise
        try:
            return PyAVReader().read(path, num_frames, sample_type, rng, max_num_frames)
        except MediaError as second:
            raise MediaError(path, f"{first.reason}; {second.reason}") from None


def frame_size(path: str) -> Tuple[int, int]:
    """(height, width) of a video's frames from its container header (no decoding)."""
    import av
    try:
        with av.open(path) as container:
            ctx = container.streams.video[0].codec_context
            return ctx.height, ctx.width
    except Exception as e:
        raise MediaError(path, f"cannot read the frame size ({type(e).__name__}: {str(e)[:160]})") from None


def check_file(path: str):
    """Missing and empty files fail before a decoder sees them (some decoders crash on them)."""
    if isinstance(path, MemoryFile):
        if not path.data:
            raise MediaError(path, "empty file (0 bytes)")
        return
    try:
        size = os.path.getsize(path)
    except OSError:
        raise MediaError(path, "no such file") from None
    if size == 0:
        raise MediaError(path, "empty file (0 bytes)")


def load_image(path: str) -> torch.Tensor:
    """An image as uint8 (1, C, H, W), RGB."""
    from PIL import Image, UnidentifiedImageError
    check_file(path)
    try:
        with Image.open(_source(path)) as im:
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(path, f"not a readable image ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)
