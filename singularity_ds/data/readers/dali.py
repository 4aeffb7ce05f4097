"""NVIDIA DALI decoding (``video_input.reader=dali``; extra ``[dali]``: ``nvidia-dali-cuda130``).

Frame indices are computed in Python with the same sampling and seeds as every other reader
(:func:`~singularity_ds.data.readers.get_frame_indices`) and fed to DALI's video decoder through an
external source, so DALI decodes exactly the frames decord would.

- :class:`DaliReader` plugs into the reader interface (``probe`` / ``decode``): decoding runs in DALI's
  CPU backend (VP8 / VP9 / MJPEG; H.264 needs the GPU ``mixed`` backend), and the usual transforms
  follow in PyTorch. It works in DataLoader workers.
- :func:`clip_pipeline` is the whole per-batch path on one device: decode the given frames, crop each
  clip with ITS box (the same for all its frames), resize to ``image_res`` (cubic), flip, normalise, and
  return (B, T, C, H, W) float -- the GPU path when ``device="gpu"``; ``device="cpu"`` runs the same
  graph for the parity tests.

Registers ``dali`` and ``auto`` (DALI with decord's per-file fallback; decord when DALI is absent).
DALI is an optional dependency: importing this module does not import it.
"""
import logging

import numpy as np
import torch

from ...errors import ConfigError, MediaError
from .base import MemoryFile, VideoReader, get_reader, register_reader

logger = logging.getLogger(__name__)


def dali_missing() -> str:
    """'' when DALI is importable, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return f"nvidia-dali is not installed ({e}); pip install 'singularity-ds[dali]'"
    return ""


def _pipeline(batch_size: int, backend: str, augment: dict = None):
    from nvidia.dali import fn, pipeline_def, types

    device_id = 0 if backend != "cpu" else None

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=device_id, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def build():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        video = fn.decoders.video(encoded, device="cpu" if backend == "cpu" else "mixed", frames=frames)
        if augment is None:
            return video
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)   # (y, x) per clip
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)     # (h, w) per clip
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        video = fn.slice(video, anchor, shape, axis_names="HW",
                         normalized_anchor=False, normalized_shape=False)
        image_res = augment["image_res"]
        video = fn.resize(video, resize_x=image_res, resize_y=image_res, interp_type=types.INTERP_CUBIC,
                          antialias=False)
        return fn.crop_mirror_normalize(video, mirror=mirror, dtype=types.FLOAT, output_layout="FCHW",
                                        mean=[255 * m for m in augment["mean"]],
                                        std=[255 * s for s in augment["std"]])

    pipe = build()
    pipe.build()
    return pipe


def _outputs(out):
    if hasattr(out, "as_cpu"):  # GPU outputs
        out = out.as_cpu()
    return [torch.from_numpy(np.array(out[i])) for i in range(len(out))]


class DaliReader(VideoReader):
    """Per-clip decoding in DALI; probing (frame count, fps) from the container index via decord/PyAV.

    ``fallback=True`` (``video_input.reader=auto``): a file DALI cannot decode (e.g. H.264 on the CPU
    decoder) is read with decord instead, and the log says so once."""

    name = "dali"

    def __init__(self, backend: str = None, fallback: bool = False):
        self.fallback, self._warned = fallback, False
        missing = dali_missing()
        if missing:
            raise ConfigError(f"video_input.reader=dali: {missing}")
        # CPU by default: readers run in DataLoader workers, where CUDA (forked) is off limits; the GPU
        # ("mixed") decoder belongs in the main process, as clip_pipeline(device="gpu") runs it
        self.backend = backend or "cpu"
        self._pipe = None

    def probe(self, path):
        try:
            return get_reader("decord").probe(path)
        except MediaError:
            return get_reader("av").probe(path)

    def decode(self, path, indices):
        if self._pipe is None:
            self._pipe = _pipeline(1, self.backend)
        data = (np.frombuffer(path.data, dtype=np.uint8) if isinstance(path, MemoryFile)
                else np.fromfile(path, dtype=np.uint8))
        self._pipe.feed_input("encoded", [data])
        self._pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
        try:
            (out,) = self._pipe.run()
        except RuntimeError as e:
            self._pipe = None  # a failed DALI pipeline cannot run again
            hint = (" (DALI's CPU decoder reads VP8/VP9/MJPEG; H.264 needs a GPU)" if self.backend == "cpu"
                    else "")
            if self.fallback:
                if not self._warned:
                    self._warned = True
                    logger.warning("DALI cannot decode %s%s; reading such files with decord", path, hint)
                return get_reader("decord").decode(path, indices)
            raise MediaError(path,
                             f"DALI cannot decode it{hint}: {str(e).strip().splitlines()[0][:160]}") from None
        return _outputs(out)[0].permute(0, 3, 1, 2).contiguous()


def clip_pipeline(paths, indices, boxes, flips, image_res, mean, std, device="gpu"):
    """Decode + crop + resize + flip + normalise a batch of clips in one DALI graph.

    ``indices``: frame indices per clip; ``boxes``: (top, left, height, width) per clip (the training
    crop, or the whole frame at evaluation); ``flips``: bool per clip. -> float (B, T, C, H, W).
    """
    pipe = _pipeline(len(paths), "cpu" if device == "cpu" else "mixed",
                     dict(image_res=image_res, mean=mean, std=std))
    pipe.feed_input("encoded", [np.fromfile(p, dtype=np.uint8) for p in paths])
    pipe.feed_input("frames", [np.asarray(i, dtype=np.int32) for i in indices])
    pipe.feed_input("anchor", [np.asarray(b[:2], dtype=np.float32) for b in boxes])
    pipe.feed_input("shape", [np.asarray(b[2:], dtype=np.float32) for b in boxes])
    pipe.feed_input("mirror", [np.asarray(int(f), dtype=np.int32) for f in flips])
    (out,) = pipe.run()
    return torch.stack(_outputs(out))


def auto_reader() -> VideoReader:
    """``video_input.reader=auto``: DALI with decord's per-file fallback, or decord when DALI is absent."""
    missing = dali_missing()
    if missing:
        logger.warning("video_input.reader=auto: %s; using decord", missing)
        return get_reader("decord")
    return DaliReader(fallback=True)


register_reader(DaliReader.name, DaliReader)
register_reader("auto", auto_reader)
