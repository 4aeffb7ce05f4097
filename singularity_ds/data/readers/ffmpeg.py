"""The FFmpeg-based CPU readers: decord (``video_input.reader=decord``, the default) and PyAV
(``av``; it reads the containers decord cannot, and is the per-file fallback of ``read_frames``)."""
from typing import Tuple

import numpy as np
import torch

from ...errors import MediaError
from .base import VideoReader, decoder_input, register_reader
from .sampling import get_frame_indices


class DecordReader(VideoReader):
    name = "decord"

    def _open(self, path):
        import decord
        try:
            return decord.VideoReader(decoder_input(path), num_threads=1)
        except Exception as e:  # decord raises its own DECORDError / RuntimeError
            raise MediaError(path, f"decord cannot open it ({str(e).splitlines()[0][:200]})") from None

    def probe(self, path):
        video = self._open(path)
        return len(video), float(video.get_avg_fps())

    def decode(self, path, indices):
        video = self._open(path)
        try:
            frames = video.get_batch(list(indices))
        except Exception as e:
            raise MediaError(path, f"decord failed to decode frames {list(indices)} "
                                   f"({str(e).splitlines()[0][:200]})") from None
        return _as_tensor(frames).permute(0, 3, 1, 2).contiguous()


def _as_tensor(batch) -> torch.Tensor:
    """decord's batch as a uint8 (T, H, W, C) tensor, whatever bridge decord is set to: the process may
    have called ``decord.bridge.set_bridge("torch")`` (the original's video_utils does, at import) or
    another framework's, which makes ``get_batch`` return that framework's array instead of decord's."""
    if isinstance(batch, torch.Tensor):
        return batch
    if hasattr(batch, "asnumpy"):  # decord's native NDArray (and mxnet's)
        return torch.from_numpy(batch.asnumpy())
    return torch.from_numpy(np.asarray(batch.numpy() if hasattr(batch, "numpy") else batch))


class PyAVReader(VideoReader):
    """PyAV (FFmpeg): reads the containers decord cannot. Decodes sequentially up to the last index."""

    name = "av"

    def _frames(self, path, stop=None):
        import av
        try:
            with av.open(decoder_input(path)) as container:
                if not container.streams.video:
                    raise MediaError(path, "no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                frames = []
                for frame in container.decode(stream):
                    frames.append(frame)
                    if stop is not None and len(frames) > stop:
                        break
                return frames, self._fps(stream, len(frames) if stop is None else 0)
        except MediaError:
            raise
        except Exception as e:
            raise MediaError(path, f"PyAV cannot decode it ({type(e).__name__}: {str(e)[:200]})") from None

    @staticmethod
    def _fps(stream, decoded: int) -> float:
        """The rate ``fpsX`` sampling reads with, as the original's ``read_frames_av`` computes it: the
        frames decoded over the stream's duration (``(duration - start_time) * time_base``), once the
        whole stream is decoded (``decoded``) and its header has a duration; else the stream's average
        (or guessed) rate; 0 when it has neither."""
        if decoded and stream.duration and stream.time_base:
            seconds = float((stream.duration - (stream.start_time or 0)) * stream.time_base)
            if seconds > 0:
                return decoded / seconds
        rate = stream.average_rate or stream.guessed_rate
        return float(rate) if rate else 0.0

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


def frame_size(path: str) -> Tuple[int, int]:
    """(height, width) of a video's frames from its container header (no decoding)."""
    import av
    try:
        with av.open(path) as container:
            codec = container.streams.video[0].codec_context
            return codec.height, codec.width
    except Exception as e:
        raise MediaError(path, f"cannot read the frame size ({type(e).__name__}: {str(e)[:160]})") from None


register_reader(PyAVReader.name, PyAVReader)
register_reader(DecordReader.name, DecordReader)
